"""The job being run and its transaction, visible anywhere below a handler."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from weakref import WeakSet

from ._exceptions import NoJobError, NoTransactionError

if TYPE_CHECKING:
    import psycopg

    from ._models import Job

__all__ = ["current_job", "current_transaction"]

# Task groups copy the context into child tasks, so tasks a handler starts
# see its job too.
# One variable for both: setting a context variable costs about a microsecond
# on trio, as much as the rest of starting a no-op job.
_running: ContextVar[tuple[Job, psycopg.AsyncConnection[object] | None] | None] = ContextVar(
    "neoq_anyio_running", default=None
)

# Connections current_transaction() handed to user code. The PostgreSQL
# backend's pool resets those as they come back (``ConnectionPool.lend``), so
# what a handler changes on its connection never reaches the next job or
# enqueue; a handler that never asks for its transaction costs no reset.
_lent: WeakSet[Any] = WeakSet()


def current_job() -> Job:
    """The job the calling handler (or a task it started) is running.

    Raises:
        NoJobError: called outside a running job.
    """
    running = _running.get()
    if running is None:
        raise NoJobError("current_job() called outside a running job")
    return running[0]


def current_transaction() -> psycopg.AsyncConnection[object]:
    """The psycopg connection inside the running job's transaction.

    Writes made through it commit atomically with the job's completion and
    roll back if the job fails. Do not commit or roll back on it yourself;
    use ``async with conn.transaction():`` for a savepoint.

    What you change on the connection (its row factory, adapters, session
    settings, LISTENs, temporary tables, advisory locks) lasts until the job
    ends: the connection is then reset before anything else uses it.

    In lease mode (``Handler(..., execution="lease")``) the job holds no
    connection until it asks: what this returns stands in for the connection,
    and its first query (``execute``, ``cursor()``, ``transaction()``,
    ``pipeline()``) borrows a pooled one, begins the transaction and locks
    the job's row under its lease; other attributes work once it is open.
    That first query raises ``LeaseLostError`` if the lease was lost.

    Raises:
        NoTransactionError: called outside a job, or on a backend without
            transactions (the in-memory backend).
    """
    running = _running.get()
    conn = running[1] if running is not None else None
    if conn is None:
        raise NoTransactionError("current_transaction() called outside a job's transaction")
    _lent.add(conn)
    return conn
