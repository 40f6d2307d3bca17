"""Running the jobs of one queue: take, run, record, in one transaction per job.

A worker takes the queue's next due job with ``BEGIN; SELECT ... FOR UPDATE
SKIP LOCKED; SAVEPOINT`` (one round trip), runs the handler with the job and
its transaction in context variables, then records the outcome decided by
``neoq_anyio._outcome``: it marks the job processed and commits, or rolls
back to the savepoint (undoing the handler's writes while keeping the row
lock), records the failure with its backoff (the handler's, or Go neoq's),
a snooze (only ``run_after`` moves), or moves the job to the dead jobs, and
commits. A process that dies mid-job loses nothing: its
transaction aborts and the job is due again.

If the worker is cancelled mid-job (shutdown past ``shutdown_timeout``), the
handler is cancelled, the pool rolls the transaction back, and the job stays
queued exactly as it was.

Recording never loops, and a run is recorded once. A success whose writes
break a deferred constraint fails inside the job's transaction, which then
records the failure. When that transaction is gone (its session ended) or
cannot record the outcome, the worker records it in a new transaction
(``JobStore.record_unlocked``): the run counts and backoff applies, as for any
failure, and meanwhile the other workers of the process leave the job alone.
If even that fails, this process leaves the job alone for a growing while
(``JobStore.hold_back``); nothing stored changes, so such a job never goes to
the dead jobs. A worker that meets database errors rests longer after each
one in a row (1 s, doubling up to 30 s), or until shutdown.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio

from neoq_anyio._exceptions import DatabaseError, PoolTimeoutError
from neoq_anyio._execution import call_handler, report
from neoq_anyio._outcome import after_failed_record, as_run, decide, refuse_to_run

from ._wakeups import Wake, Wakeups

if TYPE_CHECKING:
    from collections.abc import Callable

    from neoq_anyio._log import BackendLog
    from neoq_anyio._models import Handler, Job, RecoverCallback
    from neoq_anyio._observe import Observer
    from neoq_anyio._outcome import Outcome
    from neoq_anyio._pg._connection import AnyioConnection
    from neoq_anyio._pg._pool import ConnectionPool

    from ._store import JobStore

__all__ = ["QueueWorkers"]

_ERROR_PAUSE = 1.0  # seconds a worker rests after a database error, doubling with each in a row
_MAX_ERROR_PAUSE = 30.0
_DUE_LATER = ("retry", "snooze")  # outcomes whose job comes due again: wake its queue then


class QueueWorkers:
    """The ``handler.concurrency`` workers of one queue in one process.

    Args:
        handler: what to run.
        store: runs the job SQL.
        pool: where job transactions get their connection.
        recover: the recover callback for handler errors, if any.
        on_retry: ``on_retry(job_id, queue, delay)`` after a failure is
            scheduled for a retry ``delay`` seconds away.
        log: the backend's log.
        observer: told of each job's start and outcome (metrics, tracing).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        store: JobStore,
        pool: ConnectionPool,
        recover: RecoverCallback | None,
        on_retry: Callable[[str, str, float], None],
        log: BackendLog,
        observer: Observer | None = None,
    ) -> None:
        self.handler = handler
        self._observer = observer
        self.wakeups = Wakeups()
        self._store = store
        self._pool = pool
        self._recover = recover
        self._on_retry = on_retry
        self._log = log
        self._timeout = handler.timeout_seconds
        self._running = 0
        self._idle = anyio.Event()
        self._idle.set()
        self.in_flight = 0
        self._sweeps_seen = 0

    async def wait_stopped(self) -> None:
        """Return once every worker of the queue has returned."""
        await self._idle.wait()

    async def work(self) -> None:
        """One worker: wait for a wake-up, take jobs, until the queue stops."""
        if self._running == 0:
            self._idle = anyio.Event()
        self._running += 1
        errors = 0  # database errors in a row
        again = False  # the last take found a job: take again before waiting
        try:
            while True:
                wakeups = self.wakeups
                # After a job, look again without a wake-up: the job a hint
                # announced may have gone to another worker, whose own hint
                # then announces nothing; waiting here could leave the last
                # job of a burst to the pending-job poller.
                # A worker draining the queue skips the look for higher
                # priorities (a third of a take) until a hint announces a job.
                higher_first = True
                if again and not wakeups.stopped and not wakeups.paused:
                    higher_first = wakeups.take_hint()
                else:
                    wake = await wakeups.wait()
                    if wake is Wake.STOP:
                        return
                    if wake is Wake.SWEEP and wakeups.sweeps != self._sweeps_seen:
                        # Jobs may be anywhere, behind the watermark too.
                        self._sweeps_seen = wakeups.sweeps
                        self._store.watermark(self.handler.queue).reset()
                again = False
                mark = self.wakeups.mark()
                try:
                    found = await self._take_and_run(higher_first)
                except DatabaseError as exc:
                    errors += 1
                    pause = min(_ERROR_PAUSE * 2 ** min(errors - 1, 10), _MAX_ERROR_PAUSE)
                    self._log.warning(
                        "queue %s: database error, trying again in %g s: %s",
                        self.handler.queue,
                        pause,
                        exc,
                    )
                    await self.wakeups.rest(pause)
                    self.wakeups.retry()
                    continue
                errors = 0
                again = found
                if not found:
                    self.wakeups.found_nothing(mark)
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    def _may_take(self) -> bool:
        """Whether a take under way may send its next statement: a pause or
        shutdown meanwhile ends it (a statement sent after the pause could
        see jobs enqueued after ``pause_queue`` returned)."""
        wakeups = self.wakeups
        return not (wakeups.paused or wakeups.stopped)

    async def _take_and_run(self, higher_first: bool = True) -> bool:
        """Take the next due job and run it; False when none was due, or
        shutdown or a pause began before the take."""
        conn = await self._pool.acquire(math.inf, worker=True)
        recorded = True
        try:
            # Shutdown began, or the queue was paused, while this worker waited
            # for the connection (or ran the report of its last job): take nothing.
            if not self._may_take():
                return False
            taken = await self._store.take(
                conn, self.handler.queue, higher_first=higher_first, may_go_on=self._may_take
            )
            if taken is None:
                return False
            self.in_flight += 1
            job = taken
            observed: list[Any] = []  # the observer's state, once the handler starts
            try:
                job, outcome, failure = await self._run(conn, taken, observed)
                if failure is not None:
                    outcome, recorded = await self._record_again(conn, taken, job, outcome, failure)
            except BaseException:
                if observed and self._observer is not None:  # cancelled mid-job: no outcome
                    self._observer.job_abandoned(as_run(taken), observed[0])
                raise
            finally:
                self.in_flight -= 1
                self._store.done(taken)
        finally:
            await self._pool.release(conn)
        await report(
            outcome,
            job,
            self._recover,
            self._log,
            recorded=recorded,
            observer=self._observer,
            state=observed[0] if observed else None,
        )
        return True

    async def _run(
        self, conn: AnyioConnection, taken: Job, observed: list[Any]
    ) -> tuple[Job, Outcome, DatabaseError | None]:
        """Run one locked job and record its outcome in its transaction.

        Returns the job as run, its outcome, and why the transaction could not
        record it, if it could not. ``observed`` receives the observer's state
        as the handler starts.
        """
        job = taken
        outcome = refuse_to_run(job, datetime.now(UTC))
        if outcome is None:
            job = as_run(job)
            if self._observer is not None:
                observed.append(self._observer.job_started(job))
            exc = await call_handler(self.handler, job, self._timeout, conn)
            error = exc or self._store.handler_broke_transaction(conn)
            outcome = decide(job, error, self.handler.backoff)
        assert job.id is not None  # a stored job
        try:
            await self._store.record(conn, job.id, outcome)
        except DatabaseError as exc:
            if not self._store.still_in_transaction(conn):
                return job, outcome, exc
            # Still holding the row (a deferred constraint the handler broke,
            # a twin's failure committed meanwhile): once more, as a failure.
            outcome = after_failed_record(job, outcome, exc, self.handler.backoff)
            try:
                await self._store.record(conn, job.id, outcome)
            except DatabaseError as again:
                return job, outcome, again
        if outcome.kind in _DUE_LATER:
            self._on_retry(job.id, job.queue, outcome.delay)
        return job, outcome, None

    async def _record_again(
        self,
        conn: AnyioConnection,
        taken: Job,
        job: Job,
        outcome: Outcome,
        failure: DatabaseError,
    ) -> tuple[Outcome, bool]:
        """Record in a new transaction what the job's own could not (``failure``).

        Returns the outcome recorded (a success whose commit failed is now a
        failure) and whether it was recorded: a job someone else took
        meanwhile is theirs; one that cannot be recorded at all is held back.
        """
        assert job.id is not None  # a stored job
        outcome = after_failed_record(job, outcome, failure, self.handler.backoff)
        queue = job.queue
        extra = {"job_id": job.id, "queue": queue}
        self._log.warning(
            "job %s on queue %s: its transaction could not record the outcome (%s); "
            "recording it in a new transaction",
            job.id,
            queue,
            failure,
            extra=extra,
        )
        try:
            recorded = await self._store.record_unlocked(conn, taken, outcome)
        except (DatabaseError, PoolTimeoutError) as exc:
            seconds = self._store.hold_back(job)
            self._on_retry(job.id, queue, seconds)  # a wake-up once it may run again
            self._log.error(
                "job %s on queue %s: cannot record its outcome (%s); "
                "this process leaves it alone for %g s",
                job.id,
                queue,
                exc,
                seconds,
                extra=extra,
            )
            return outcome, False
        if not recorded:
            self._log.warning(
                "job %s on queue %s: outcome not recorded: the job was taken or "
                "recorded elsewhere meanwhile",
                job.id,
                queue,
                extra=extra,
            )
        elif outcome.kind in _DUE_LATER:
            self._on_retry(job.id, queue, outcome.delay)
        return outcome, recorded
