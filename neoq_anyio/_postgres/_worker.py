"""Running the jobs of one queue: take, run, record, in one transaction per job.

A worker takes the queue's next due job with ``BEGIN; SELECT ... FOR UPDATE
SKIP LOCKED; SAVEPOINT`` (one round trip), runs the handler with the job and
its transaction in context variables, then either marks the job processed
and commits, or rolls back to the savepoint (undoing the handler's writes
while keeping the row lock), records the failure with Go neoq's backoff, or
moves the job to the dead jobs, and commits. A process that dies mid-job
loses nothing: its transaction aborts and the job is due again.

If the worker is cancelled mid-job (shutdown past ``shutdown_timeout``), the
handler is cancelled, the pool rolls the transaction back, and the job stays
queued exactly as it was.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import psycopg
from psycopg import pq

from neoq_anyio._exceptions import DatabaseError, JobDeadlineError
from neoq_anyio._execution import call_handler, call_recover, describe_error
from neoq_anyio._models import Job
from neoq_anyio._outcome import decide_failure

from . import _sql
from ._wakeups import Wake, Wakeups

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

    from neoq_anyio._models import Handler, RecoverCallback
    from neoq_anyio._pg._connection import AnyioConnection
    from neoq_anyio._pg._pool import ConnectionPool

__all__ = ["QueueWorkers"]

_INERROR = pq.TransactionStatus.INERROR
_DB_ERRORS = (psycopg.Error, DatabaseError)
_ERROR_PAUSE = 1.0  # seconds a worker rests after a database error


class QueueWorkers:
    """The ``handler.concurrency`` workers of one queue in one process.

    Args:
        handler: what to run.
        pool: where job transactions get their connection.
        wakeups: the queue's wake-up signal (see ``_wakeups``).
        recovery_callback: the backend-wide default recover callback.
        on_retry: ``on_retry(job_id, queue, delay)`` after a failure is
            scheduled for a retry ``delay`` seconds away.
        logger: returns the backend's current logger.
        redact: scrubs secrets from messages.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        pool: ConnectionPool,
        wakeups: Wakeups,
        recovery_callback: RecoverCallback | None,
        on_retry: Callable[[int, str, float], None],
        logger: Callable[[], logging.Logger],
        redact: Callable[[str], str],
    ) -> None:
        self.handler = handler
        self.wakeups = wakeups
        self._pool = pool
        self._recover = handler.recover_callback or recovery_callback
        self._on_retry = on_retry
        self._logger = logger
        self._redact = redact
        self._timeout = handler.timeout_seconds
        self._take_sql: str | None = None  # built on first use, with the connection's encoding
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
                except _DB_ERRORS as exc:
                    self._logger().warning(
                        "queue %s: database error, trying again in %g s: %s",
                        self.handler.queue,
                        _ERROR_PAUSE,
                        self._redact(str(exc)),
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
        failure: tuple[Job, BaseException] | None = None
        try:
            if self._take_sql is None:
                self._take_sql = _sql.take_job(self.handler.queue, conn)
            cur = await conn.execute(self._take_sql)
            cur.nextset()  # past BEGIN, to the SELECT's rows
            row = await cur.fetchone()
            if row is None:
                await conn.execute("ROLLBACK")
                return False
            job = Job._from_row(**dict(zip(_sql.JOB_COLUMN_NAMES, row, strict=True)))
            self.in_flight += 1
            try:
                failure = await self._run(conn, job)
            finally:
                self.in_flight -= 1
        finally:
            await self._pool.release(conn)
        if failure is not None and self._recover is not None:
            await call_recover(self._recover, *failure, self._logger())
        return True

    async def _run(self, conn: AnyioConnection, job: Job) -> tuple[Job, BaseException] | None:
        """Run one locked job and record its outcome; returns a handler failure."""
        job_id = int(job.id or 0)
        if job.deadline is not None and job.deadline <= datetime.now(UTC):
            # Retrying cannot help a job past its deadline: it goes straight
            # to the dead jobs, unrun.
            late = JobDeadlineError(f"the job's deadline {job.deadline.isoformat()} has passed")
            await conn.execute(_sql.bury_job(job_id, job.retries, describe_error(late), conn))
            self._logger().warning("job %s on queue %s not run: %s", job.id, job.queue, late)
            return None
        if job.status == "failed":
            job = job._replace(retries=job.retries + 1)  # this run is a retry
        exc = await call_handler(self.handler, job, self._timeout, conn)
        if exc is None and conn.pgconn.transaction_status == _INERROR:
            exc = DatabaseError("the handler left the job's transaction aborted")
        if exc is None:
            await conn.execute(_sql.complete_job(job_id, job.retries))
            return None
        decision = decide_failure(job.retries, job.max_retries)
        message = describe_error(exc)
        if decision.dead:
            await conn.execute(_sql.bury_job(job_id, job.retries, message, conn))
        else:
            await conn.execute(_sql.fail_job(job_id, job.retries, message, decision.delay, conn))
            self._on_retry(job_id, job.queue, decision.delay)
        self._logger().error(
            "job %s on queue %s failed (%s): %s",
            job.id,
            job.queue,
            "moved to dead jobs" if decision.dead else f"retry in {decision.delay:g} s",
            message,
        )
        return job, exc
