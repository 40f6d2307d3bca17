"""What a handler raises to steer its job instead of failing it: ``Snooze`` and ``Discard``.

They are signals from user code to the worker, not errors of neoq_anyio, so
they do not derive from ``NeoqError``: a handler's own ``except NeoqError:``
(around ``current_transaction()``, say) never catches one by accident. They
derive from ``Exception``, not ``BaseException``, which stays reserved for
what must stop a task (cancellation, ``KeyboardInterrupt``); a handler's
``except Exception:`` that does not re-raise swallows them, as it swallows
any failure.

``neoq_anyio._outcome.decide`` turns them into outcomes: a snooze keeps the
job as it was, due again later; a discard sends it to the dead jobs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from ._durations import to_seconds
from ._exceptions import ConfigurationError

if TYPE_CHECKING:
    from datetime import timedelta

__all__ = ["MAX_DELAY_SECONDS", "Discard", "Snooze"]

MAX_DELAY_SECONDS = 100 * 365 * 24 * 3600.0
"""The longest delay a snooze or a handler's backoff may ask for (about 100
years): beyond it PostgreSQL's intervals and Python's datetimes overflow, and
such a job would never run anyway."""


@final
class Snooze(Exception):
    """Raise it in a handler to run the job again ``seconds`` from now,
    without counting a failure.

    The run's writes through ``current_transaction()`` roll back, as for a
    failure. The job keeps its status (``new`` or ``failed``), its
    ``retries`` (the snoozed run does not count as a retry) and its
    ``error``; only its ``run_after`` moves. The recover callback is not
    called. See the docs' "Retry policy".

    Args:
        seconds: how long to wait, in seconds (``float``) or as a
            ``timedelta``; ``0`` makes the job due again at once.

    Attributes:
        seconds: the delay in seconds.

    Raises:
        ConfigurationError: ``seconds`` is negative, not a duration, or over
            100 years (then the handler fails with it, as with any error).
    """

    seconds: float

    def __init__(self, seconds: float | timedelta) -> None:
        value = to_seconds(seconds, name="Snooze seconds")
        if value > MAX_DELAY_SECONDS:
            raise ConfigurationError(f"Snooze seconds must be at most 100 years, got {value:g}")
        super().__init__(seconds)
        self.seconds = value

    def __str__(self) -> str:
        return f"snoozed for {self.seconds:g} s"


@final
class Discard(Exception):
    """Raise it in a handler to send the job to the dead jobs at once, even
    if it has retries left.

    The run's writes through ``current_transaction()`` roll back. The dead
    job's ``error`` reads ``"Discard: <reason>"``. The recover callback is
    not called: the handler decided, nothing went wrong. ``retry_job`` brings
    the job back, as any dead job. See the docs' "Retry policy".

    Args:
        reason: why, stored in the dead job's ``error``.

    Attributes:
        reason: as given.
    """

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
