"""neoq_anyio: background jobs on PostgreSQL for trio and asyncio.

Go's neoq rebuilt for structured concurrency: ``open_backend`` yields a
backend whose one task group holds every background task.
"""

from __future__ import annotations

import contextlib

from ._backend import Backend as Backend
from ._backend import BackendStatistics as BackendStatistics
from ._context import current_job as current_job
from ._context import current_transaction as current_transaction
from ._control import Discard as Discard
from ._control import Snooze as Snooze
from ._exceptions import ConfigurationError as ConfigurationError
from ._exceptions import ConnectionStringError as ConnectionStringError
from ._exceptions import DatabaseError as DatabaseError
from ._exceptions import DuplicateJobError as DuplicateJobError
from ._exceptions import InvalidJobError as InvalidJobError
from ._exceptions import JobDeadlineError as JobDeadlineError
from ._exceptions import JobLostError as JobLostError
from ._exceptions import JobTimeoutError as JobTimeoutError
from ._exceptions import LeaseLostError as LeaseLostError
from ._exceptions import NeoqError as NeoqError
from ._exceptions import NoJobError as NoJobError
from ._exceptions import NoQueueError as NoQueueError
from ._exceptions import NoTransactionError as NoTransactionError
from ._exceptions import PoolTimeoutError as PoolTimeoutError
from ._memory import MemoryBackend as MemoryBackend
from ._models import Handler as Handler
from ._models import Job as Job
from ._models import QueueStats as QueueStats
from ._open import DEFAULT_CONNECTION_TIMEOUT as DEFAULT_CONNECTION_TIMEOUT
from ._open import open_backend as open_backend
from ._pg._connection import AnyioConnection as AnyioConnection
from ._pg._pool import PoolStatistics as PoolStatistics
from ._postgres._backend import PostgresBackend as PostgresBackend
from ._postgres._sql import FutureJobQuery as FutureJobQuery
from ._postgres._sql import JobQuery as JobQuery
from ._postgres._sql import PendingJobIDQuery as PendingJobIDQuery

__all__ = (
    "DEFAULT_CONNECTION_TIMEOUT",
    "AnyioConnection",
    "Backend",
    "BackendStatistics",
    "ConfigurationError",
    "ConnectionStringError",
    "DatabaseError",
    "Discard",
    "DuplicateJobError",
    "FutureJobQuery",
    "Handler",
    "InvalidJobError",
    "Job",
    "JobDeadlineError",
    "JobLostError",
    "JobQuery",
    "JobTimeoutError",
    "LeaseLostError",
    "MemoryBackend",
    "NeoqError",
    "NoJobError",
    "NoQueueError",
    "NoTransactionError",
    "PendingJobIDQuery",
    "PoolStatistics",
    "PoolTimeoutError",
    "PostgresBackend",
    "QueueStats",
    "Snooze",
    "current_job",
    "current_transaction",
    "open_backend",
)

# Public objects say they live here, not in the private module that defines them.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("neoq_anyio."):
        with contextlib.suppress(AttributeError, TypeError):
            _obj.__module__ = __name__
del _name, _obj
