"""What a job's run leads to: one pure decision, applied by every execution path.

A worker (the PostgreSQL transaction worker, the in-memory worker, and any
later execution mode) asks ``refuse_to_run`` before it runs a job, runs the
handler on ``as_run(job)``, and asks ``decide`` what the run leads to. It then
stores the ``Outcome`` its own way (SQL, or a dict), and ``report``s it
(``neoq_anyio._execution``), which logs the same lines for every backend. No
I/O here, so the rules (Go neoq's retry counting, backoff and dead jobs) are
tested without a database.

A handler steers its job with ``Snooze`` (outcome ``snooze``: due again
later, as it was) or ``Discard`` (outcome ``dead``), and a ``Handler``'s
``backoff`` replaces Go neoq's delay before a retry; all three are decided
here, so every worker only stores the outcome's kind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from ._control import MAX_DELAY_SECONDS, Discard, Snooze
from ._durations import to_seconds
from ._exceptions import ConfigurationError, JobDeadlineError

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from ._models import Backoff, Job

__all__ = [
    "Outcome",
    "after_failed_record",
    "as_run",
    "backoff_seconds",
    "decide",
    "describe_error",
    "handler_backoff",
    "hold_back_seconds",
    "refuse_to_run",
    "scrubbed",
    "steered",
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
            ``snooze`` (the handler raised ``Snooze``: due again in ``delay``
            s, its status and ``error`` as they were); or ``dead`` (moved to
            the dead jobs).
        retries: the job's ``retries`` to store.
        error: the text for the ``error`` column (``None`` when processed,
            and for a snooze, which leaves the column as it was).
        delay: seconds until a retry or a snoozed job is due.
        exc: what the handler raised (or why the job was not run), for the
            recover callback and the log.
        ran: whether the handler ran (``False`` for a job past its deadline).
        backoff_error: why the handler's ``backoff`` could not give the
            retry's delay (it raised, or returned no duration), when Go
            neoq's backoff was used instead; for the log.
    """

    kind: Literal["processed", "retry", "snooze", "dead"]
    retries: int
    error: str | None = None
    delay: float = 0.0
    exc: BaseException | None = None
    ran: bool = True
    backoff_error: BaseException | None = None


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


def decide(job: Job, exc: BaseException | None, backoff: Backoff | None = None) -> Outcome:
    """The outcome of a run of ``job`` (as returned by ``as_run``) that raised ``exc``.

    Success marks the job processed. ``Snooze`` makes it due again after the
    snooze's delay, with the ``retries`` it had before this run (``as_run``
    counted the run; a snoozed run is not a retry). ``Discard`` moves it to
    the dead jobs at once. A failure when ``retries`` already equals
    ``max_retries`` moves the job to the dead jobs; ``max_retries=None`` (a
    NULL column, as Go neoq may write) never does. Any other failure is
    retried after ``backoff(retries)`` (``handler_backoff``), or Go neoq's
    ``backoff_seconds(retries)`` without one: ``retries`` is the failed
    run's, 0 for a job's first failure.
    """
    retries = job.retries
    if exc is None:
        # Shared for the common case: building one costs more than a no-op job.
        return _PROCESSED_FIRST_RUN if retries == 0 else Outcome("processed", retries)
    signal = steered(exc)
    if isinstance(signal, Snooze):
        return Outcome("snooze", _stored_retries(job), delay=signal.seconds, exc=signal)
    if signal is not None:
        return Outcome("dead", retries, describe_error(signal), exc=signal)
    error = describe_error(exc)
    if job.max_retries is not None and retries >= job.max_retries:
        return Outcome("dead", retries, error, exc=exc)
    if backoff is None:
        return Outcome("retry", retries, error, delay=backoff_seconds(retries), exc=exc)
    delay, broken = handler_backoff(backoff, retries)
    return Outcome("retry", retries, error, delay=delay, exc=exc, backoff_error=broken)


def steered(exc: BaseException) -> Snooze | Discard | None:
    """The ``Snooze`` or ``Discard`` a handler raised, if ``exc`` is one.

    Also found inside exception groups holding nothing else (a handler's
    task group wraps what its child task raised): a group of one, of one...
    Anything else alongside it makes the run a plain failure.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, Snooze | Discard) else None


def _stored_retries(job: Job) -> int:
    """``retries`` to store for a snoozed run of ``job`` (as ``as_run`` gave
    it): as before the run, which ``as_run`` counted for a failed job, so the
    snoozed run is not a retry. (A lease-mode claim counts as ``as_run``
    does; one that took over a lost lease counted that lost attempt as well,
    and it stays counted, new job or failed.)"""
    return job.retries - 1 if job.status == "failed" else job.retries


def handler_backoff(backoff: Backoff, retries: int) -> tuple[float, BaseException | None]:
    """Seconds before a retry, from a handler's ``backoff`` given the failed
    run's ``retries``; and why it could not say, if it could not.

    A backoff that raises, or returns anything but a non-negative duration
    (seconds or ``timedelta``) up to 100 years, must not lose the job: Go
    neoq's ``backoff_seconds`` is used instead, and the reason returned for
    the log.
    """
    try:
        delay = to_seconds(backoff(retries), name="the handler's backoff")
        if delay > MAX_DELAY_SECONDS:
            raise ConfigurationError(
                f"the handler's backoff must be at most 100 years, got {delay:g}"
            )
    except Exception as exc:
        return float(backoff_seconds(retries)), exc
    return delay, None


def after_failed_record(
    job: Job, outcome: Outcome, error: BaseException, backoff: Backoff | None = None
) -> Outcome:
    """What to record in a new transaction when the job's own transaction could
    not record ``outcome`` for ``job`` (as run), failing with ``error``.

    That transaction is gone, and the handler's writes with it, so a run that
    succeeded is a failure now, with ``error``'s text: the run counts, and
    backoff (the handler's ``backoff``, if any) applies. A failure, a snooze,
    a discard, or a job refused unrun keeps its outcome.
    """
    return decide(job, error, backoff) if outcome.kind == "processed" else outcome


def scrubbed(outcome: Outcome, redact: Callable[[str], str]) -> Outcome:
    """``outcome`` with its error text passed through ``redact`` (an exception
    message may quote the connection string and its password)."""
    if outcome.error is None:
        return outcome
    error = redact(outcome.error)
    return outcome if error == outcome.error else replace(outcome, error=error)


def hold_back_seconds(failures: int) -> float:
    """How long a process leaves alone a job whose outcome it failed to record
    ``failures`` times in a row, even in a new transaction: 1 s, doubling up to
    10 minutes. The job stays due in the database (nothing could be written),
    so this is what keeps it from running again at once, for ever."""
    return float(min(2 ** min(failures - 1, 10), 600))
