"""Running the jobs of one queue: take, run, record, in one transaction per job.

A worker takes the queue's next due job with ``BEGIN; SELECT ... FOR UPDATE
SKIP LOCKED; SAVEPOINT`` (one round trip), runs the handler with the job and
its transaction in context variables, then records the outcome decided by
``neoq_anyio._outcome``: it marks the job processed and commits, or rolls
back to the savepoint (undoing the handler's writes while keeping the row
lock), records the failure with Go neoq's backoff or moves the job to the
dead jobs, and commits. A process that dies mid-job loses nothing: its
transaction aborts and the job is due again.

If the worker is cancelled mid-job (shutdown past ``shutdown_timeout``), the
handler is cancelled, the pool rolls the transaction back, and the job stays
queued exactly as it was.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio

from neoq_anyio._exceptions import DatabaseError
from neoq_anyio._execution import call_handler, report
from neoq_anyio._outcome import as_run, decide, refuse_to_run

from ._wakeups import Wake, Wakeups

if TYPE_CHECKING:
    from collections.abc import Callable

    from neoq_anyio._log import BackendLog
    from neoq_anyio._models import Handler, Job, RecoverCallback
    from neoq_anyio._outcome import Outcome
    from neoq_anyio._pg._connection import AnyioConnection
    from neoq_anyio._pg._pool import ConnectionPool

    from ._store import JobStore

__all__ = ["QueueWorkers"]

_ERROR_PAUSE = 1.0  # seconds a worker rests after a database error


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
    ) -> None:
        self.handler = handler
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

    async def wait_stopped(self) -> None:
        """Return once every worker of the queue has returned."""
        await self._idle.wait()

    async def work(self) -> None:
        """One worker: wait for a wake-up, take jobs, until the queue stops."""
        if self._running == 0:
            self._idle = anyio.Event()
        self._running += 1
        try:
            while True:
                wake = await self.wakeups.wait()
                if wake is Wake.STOP:
                    return
                mark = self.wakeups.mark()
                try:
                    found = await self._take_and_run()
                except DatabaseError as exc:
                    self._log.warning(
                        "queue %s: database error, trying again in %g s: %s",
                        self.handler.queue,
                        _ERROR_PAUSE,
                        exc,
                    )
                    await anyio.sleep(_ERROR_PAUSE)
                    self.wakeups.retry()
                    continue
                if not found:
                    self.wakeups.found_nothing(mark)
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    async def _take_and_run(self) -> bool:
        """Take the next due job and run it; False when none was due."""
        conn = await self._pool.acquire(math.inf)
        try:
            job = await self._store.take(conn, self.handler.queue)
            if job is None:
                return False
            self.in_flight += 1
            try:
                job, outcome = await self._run(conn, job)
            finally:
                self.in_flight -= 1
        finally:
            await self._pool.release(conn)
        await report(outcome, job, self._recover, self._log)
        return True

    async def _run(self, conn: AnyioConnection, job: Job) -> tuple[Job, Outcome]:
        """Run one locked job and record its outcome; returns the job as run."""
        outcome = refuse_to_run(job, datetime.now(UTC))
        if outcome is None:
            job = as_run(job)
            exc = await call_handler(self.handler, job, self._timeout, conn)
            outcome = decide(job, exc or self._store.handler_broke_transaction(conn))
        assert job.id is not None  # a stored job
        await self._store.record(conn, job.id, outcome)
        if outcome.kind == "retry":
            self._on_retry(job.id, job.queue, outcome.delay)
        return job, outcome
