"""What a job's run leads to: one pure decision, applied by every execution path.

A worker (the PostgreSQL transaction worker, the in-memory worker, and any
later execution mode) asks ``refuse_to_run`` before it runs a job, runs the
handler on ``as_run(job)``, and asks ``decide`` what the run leads to. It then
stores the ``Outcome`` its own way (SQL, or a dict), and ``report``s it
(``neoq_anyio._execution``), which logs the same lines for every backend. No
I/O here, so the rules (Go neoq's retry counting, backoff and dead jobs) are
tested without a database.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ._exceptions import JobDeadlineError

if TYPE_CHECKING:
    from datetime import datetime

    from ._models import Job

__all__ = [
    "Outcome",
    "after_failed_record",
    "as_run",
    "backoff_seconds",
    "decide",
    "describe_error",
    "hold_back_seconds",
    "refuse_to_run",
    "storable_text",
]

MAX_ERROR_CHARS = 10_000
"""Longest error text stored; longer messages are cut (a payload quoted in an
exception message must not bloat every row it fails)."""


def backoff_seconds(retries: int, *, jitter: int | None = None) -> int:
    """Seconds to wait before retrying a job that failed with ``retries`` retries so far.

    Go neoq's formula (taken from Sidekiq): ``r**4 + 15 + rand(0..29) * r + 1``.
    ``jitter`` fixes the random term, for tests.
    """
    rand = random.randrange(30) if jitter is None else jitter
    return retries**4 + 15 + rand * retries + 1


def describe_error(exc: BaseException) -> str:
    """The text stored in a failed job's ``error`` column: ``"Type: message"``.

    Never raises, whatever the exception: a ``str()`` that raises is named
    instead of its message, and the text is made storable (``storable_text``).
    """
    name = type(exc).__name__
    try:
        message = str(exc)
    except Exception as broken:  # a user's __str__; the job must still be recorded
        message = f"<str() raised {type(broken).__name__}>"
    return storable_text(f"{name}: {message}" if message else name)


def storable_text(text: str) -> str:
    """``text`` as a PostgreSQL text column takes it, and capped in length.

    A NUL, which PostgreSQL refuses in text, becomes ``\\x00``; a lone
    surrogate, which cannot be encoded at all, becomes its ``\\udXXX``
    escape; past ``MAX_ERROR_CHARS`` characters the text is cut, saying so.
    """
    if len(text) > MAX_ERROR_CHARS:
        text = f"{text[:MAX_ERROR_CHARS]}... ({len(text) - MAX_ERROR_CHARS} more characters)"
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode(errors="backslashreplace").decode()
    return text


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to record for one job.

    Attributes:
        kind: ``processed``; ``retry`` (failed, due again in ``delay`` s);
            or ``dead`` (moved to the dead jobs).
        retries: the job's ``retries`` to store.
        error: the text for the ``error`` column (``None`` when processed).
        delay: seconds until a retry is due.
        exc: what the handler raised (or why the job was not run), for the
            recover callback and the log.
        ran: whether the handler ran (``False`` for a job past its deadline).
    """

    kind: Literal["processed", "retry", "dead"]
    retries: int
    error: str | None = None
    delay: float = 0.0
    exc: BaseException | None = None
    ran: bool = True


_PROCESSED_FIRST_RUN: Outcome = Outcome("processed", 0)


def as_run(job: Job) -> Job:
    """The job as its handler sees it: a run of a failed job is a retry, and
    counts as one (Go neoq's counting, so Go and Python workers agree)."""
    return job._evolve(retries=job.retries + 1) if job.status == "failed" else job


def refuse_to_run(job: Job, now: datetime) -> Outcome | None:
    """A dead outcome, unrun, for a job whose deadline has passed; else ``None``.

    Retrying cannot help such a job, so it is not retried either.
    """
    if job.deadline is None or job.deadline > now:
        return None
    late = JobDeadlineError(f"the job's deadline {job.deadline.isoformat()} has passed")
    return Outcome("dead", job.retries, describe_error(late), exc=late, ran=False)


def decide(job: Job, exc: BaseException | None) -> Outcome:
    """The outcome of a run of ``job`` (as returned by ``as_run``) that raised ``exc``.

    Success marks the job processed. A failure when ``retries`` already
    equals ``max_retries`` moves the job to the dead jobs; ``max_retries=None``
    (a NULL column, as Go neoq may write) never does. Any other failure is
    retried after ``backoff_seconds``.
    """
    retries = job.retries
    if exc is None:
        # Shared for the common case: building one costs more than a no-op job.
        return _PROCESSED_FIRST_RUN if retries == 0 else Outcome("processed", retries)
    error = describe_error(exc)
    if job.max_retries is not None and retries >= job.max_retries:
        return Outcome("dead", retries, error, exc=exc)
    return Outcome("retry", retries, error, delay=backoff_seconds(retries), exc=exc)


def after_failed_record(job: Job, outcome: Outcome, error: BaseException) -> Outcome:
    """What to record in a new transaction when the job's own transaction could
    not record ``outcome`` for ``job`` (as run), failing with ``error``.

    That transaction is gone, and the handler's writes with it, so a run that
    succeeded is a failure now, with ``error``'s text: the run counts, and
    backoff applies. A failure, or a job refused unrun, keeps its outcome.
    """
    return decide(job, error) if outcome.kind == "processed" else outcome


def hold_back_seconds(failures: int) -> float:
    """How long a process leaves alone a job whose outcome it failed to record
    ``failures`` times in a row, even in a new transaction: 1 s, doubling up to
    10 minutes. The job stays due in the database (nothing could be written),
    so this is what keeps it from running again at once, for ever."""
    return float(min(2 ** min(failures - 1, 10), 600))
