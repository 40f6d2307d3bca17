"""Running a handler: its context, its timeout, and reporting what came of it.

Every execution path (the PostgreSQL transaction worker, the in-memory
worker) calls handlers and applies job timeouts through this module, and
reports outcomes (``neoq_anyio._outcome``) through ``report``, so the rules
and the log lines are the same everywhere.

Two ways to time a handler, one rule: past ``job_timeout`` the handler is
cancelled and the run fails with ``timeout_error``. ``call_handler`` opens a
cancel scope per job; ``WorkerTimer`` keeps one scope per worker and moves
its deadline lazily, for the in-memory backend, where a scope with a
deadline costs more than a no-op job.
"""

from __future__ import annotations

import inspect
import logging
import math
import traceback
from typing import TYPE_CHECKING, Any

import anyio

from ._context import _running
from ._control import Discard, Snooze
from ._exceptions import JobTimeoutError

if TYPE_CHECKING:
    import psycopg

    from ._log import BackendLog
    from ._models import Handler, Job, RecoverCallback
    from ._observe import Observer
    from ._outcome import Outcome

__all__ = ["WorkerTimer", "call_handler", "report", "run_handler", "timeout_error"]


def timeout_error(timeout: float | None) -> JobTimeoutError:
    """What a run cut short by its ``job_timeout`` failed with."""
    return JobTimeoutError(f"the job ran past its job_timeout of {timeout:g} s")


async def run_handler(
    handler: Handler, job: Job, transaction: psycopg.AsyncConnection[Any] | None = None
) -> Exception | None:
    """Run the handler with the job (and its transaction) in context; returns
    what it raised, if anything. Cancellation propagates."""
    token = _running.set((job, transaction))
    try:
        await handler.handle(job)
    except Exception as exc:
        return exc
    finally:
        _running.reset(token)
    return None


async def call_handler(
    handler: Handler,
    job: Job,
    timeout: float | None,
    transaction: psycopg.AsyncConnection[Any] | None = None,
) -> Exception | None:
    """``run_handler`` under the handler's timeout (a cancel scope of its own).

    A run that reached its timeout failed with ``timeout_error``, even when the
    handler caught the cancellation and returned (or raised something else).
    """
    exc = None
    with anyio.CancelScope() as scope:
        if timeout is not None:
            scope.deadline = anyio.current_time() + timeout
        exc = await run_handler(handler, job, transaction)
    # cancel_called, not cancelled_caught: a handler that swallows the
    # cancellation must not turn a timeout into a success.
    if scope.cancel_called:
        error = timeout_error(timeout)
        error.__context__ = exc
        return error
    return exc


class WorkerTimer:
    """One worker's job timeout on a single cancel scope for many jobs.

    The worker enters ``scope()`` around its loop and calls ``start()`` as
    each job begins. The deadline moves only when it would fire before the
    job's timeout, to that timeout plus a little slack, so a job is cancelled
    between ``job_timeout`` and ``job_timeout`` + 1 % (at most 50 ms) after it
    started. When the scope fires, the running job fails with ``error()``
    and the worker enters a new scope.
    """

    __slots__ = ("_scope", "_slack", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._slack = 0.0 if timeout is None else min(timeout / 100, 0.05)
        self._scope = anyio.CancelScope()

    def scope(self) -> anyio.CancelScope:
        """A fresh scope, disarmed; enter it around the worker's loop."""
        self._scope = anyio.CancelScope()
        return self._scope

    def start(self) -> None:
        """A job starts now: make sure the scope fires at its timeout."""
        if self.timeout is None:
            return
        due = anyio.current_time() + self.timeout
        if not due <= self._scope.deadline <= due + self._slack:
            self._scope.deadline = due + self._slack

    def pause(self) -> None:
        """No job runs (the worker idles, or calls a recover callback)."""
        self._scope.deadline = math.inf

    def fired(self) -> bool:
        """Whether the scope fired: the running job reached its timeout, even
        if its handler caught the cancellation and returned."""
        return self._scope.cancel_called

    def error(self) -> JobTimeoutError:
        return timeout_error(self.timeout)


async def report(
    outcome: Outcome,
    job: Job,
    callback: RecoverCallback | None,
    log: BackendLog,
    *,
    recorded: bool = True,
    observer: Observer | None = None,
    state: Any = None,
) -> None:
    """Log an outcome, tell the observer, then call the recover callback for a
    handler's error.

    Successes and snoozes are not logged above DEBUG; a discard is a WARNING
    without traceback (the handler decided); failures are logged with their
    traceback, and a handler's ``backoff`` that failed is a WARNING of its
    own. ``recorded=False`` says the outcome could not be stored, so the job
    will run again. The recover callback is not called for ``Snooze`` and
    ``Discard``, which are no errors. A recover callback's own errors are
    logged, never raised. ``observer`` (metrics, tracing) gets
    ``job_finished`` with ``state``, what its ``job_started`` returned
    (``None``: the job did not run), after the log line, so that line is
    written inside the job's span.
    """
    if observer is not None:
        try:
            _log_outcome(outcome, job, log, recorded)
        finally:
            observer.job_finished(job, outcome, state)
    else:
        _log_outcome(outcome, job, log, recorded)
    if outcome.kind == "processed" or not outcome.ran:
        return
    if callback is None or outcome.exc is None or isinstance(outcome.exc, Snooze | Discard):
        return
    extra = {"job_id": job.id, "queue": job.queue}
    try:
        result = callback(job, outcome.exc)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("recover callback failed for job %s", job.id, extra=extra)


def _log_outcome(outcome: Outcome, job: Job, log: BackendLog, recorded: bool) -> None:
    """``report``'s log line: DEBUG for a success or a snooze, WARNING for a
    job not run or discarded, ERROR with the traceback for a failed run."""
    if outcome.kind == "processed":
        if log.logger.isEnabledFor(logging.DEBUG):
            extra = {"job_id": job.id, "queue": job.queue}
            log.debug("job %s on queue %s processed", job.id, job.queue, extra=extra)
        return
    extra = {"job_id": job.id, "queue": job.queue}
    if not outcome.ran:
        log.warning("job %s on queue %s not run: %s", job.id, job.queue, outcome.exc, extra=extra)
        return
    if outcome.backoff_error is not None:
        _log_broken_backoff(outcome, job, log)
    then = "not recorded: it will run again"
    if outcome.kind == "snooze":
        if not recorded:
            log.warning("job %s on queue %s snoozed (%s)", job.id, job.queue, then, extra=extra)
        elif log.logger.isEnabledFor(logging.DEBUG):
            log.debug(
                "job %s on queue %s snoozed (due again in %g s)",
                job.id,
                job.queue,
                outcome.delay,
                extra=extra,
            )
        return
    if isinstance(outcome.exc, Discard):
        then = "moved to dead jobs" if recorded else then
        log.warning(
            "job %s on queue %s discarded by its handler (%s): %s",
            job.id,
            job.queue,
            then,
            outcome.exc.reason,
            extra=extra,
        )
        return
    if log.logger.isEnabledFor(logging.ERROR):
        if not recorded:
            then = "not recorded: it will run again"
        elif outcome.kind == "dead":
            then = "moved to dead jobs"
        else:
            then = f"retry in {outcome.delay:g} s"
        exc_info, traceback_text = _traceback(outcome.exc, log)
        log.error(
            "job %s on queue %s failed (%s): %s%s",
            job.id,
            job.queue,
            then,
            outcome.error,
            traceback_text,
            extra=extra,
            exc_info=exc_info,
        )


def _log_broken_backoff(outcome: Outcome, job: Job, log: BackendLog) -> None:
    """The handler's ``backoff`` raised or returned no duration: say so, with
    its traceback, and that Go neoq's backoff stood in."""
    exc_info, traceback_text = _traceback(outcome.backoff_error, log)
    log.warning(
        "job %s on queue %s: the handler's backoff failed (%s); Go neoq's backoff "
        "(%g s) used instead%s",
        job.id,
        job.queue,
        outcome.backoff_error,
        outcome.delay,
        traceback_text,
        extra={"job_id": job.id, "queue": job.queue},
        exc_info=exc_info,
    )


def _traceback(exc: BaseException | None, log: BackendLog) -> tuple[BaseException | None, str]:
    """How to log ``exc``'s traceback: as the record's ``exc_info`` (what log
    handlers and error trackers expect), or, when its text holds a secret the
    log redacts, as redacted text appended to the message (``BackendLog``
    redacts messages, but a formatter prints ``exc_info`` as it is)."""
    if exc is None or exc.__traceback__ is None:
        return None, ""  # never raised (a timeout): nothing to show
    text = "".join(traceback.format_exception(exc)).rstrip()
    if log.redact(text) == text:
        return exc, ""
    return None, "\n" + text  # BackendLog redacts the whole message
