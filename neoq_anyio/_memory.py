"""The in-memory backend: the same API and job semantics, no database.

For development and tests: handlers written for PostgreSQL run unchanged.
Jobs live in a dict; each queue keeps a heap of ``(due time, id)``, so future
jobs and retries need no scheduler: an idle worker sleeps until the earliest
job is due or a new one arrives.

Time comes from ``MemoryClock``: wall time derived from AnyIO's clock, which
``fast_forward`` can move ahead. Under trio's ``MockClock(autojump_threshold=0)``
future jobs, retries and cron ticks therefore come due without real waiting.

Differences from PostgreSQL (documented for users): nothing survives the
process; ``current_transaction()`` and ``connection()`` raise
``NoTransactionError``; ``max_queue_capacity`` makes ``enqueue`` wait while the
queue holds that many unprocessed jobs (as Go neoq's memory backend does);
connection options are accepted and ignored.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import deque
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._backend import BackendCore, BackendStatistics, Options
from ._cron import WallClock
from ._exceptions import (
    DuplicateJobError,
    JobDeadlineError,
    JobTimeoutError,
    NoTransactionError,
)
from ._execution import call_recover, describe_error, run_handler
from ._fingerprint import encode_payload
from ._models import Job, validate_job
from ._outcome import decide_failure
from ._sync import wait_in_line

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    import psycopg
    from anyio.abc import TaskGroup

    from ._models import Handler, RecoverCallback
    from ._pg._connection import AnyioConnection

__all__ = ["MemoryBackend", "MemoryClock"]

_STREAK = 8  # jobs a worker runs back to back before it yields to the loop


class MemoryClock(WallClock):
    """Wall time that follows AnyIO's clock, and can be moved forward.

    ``monotonic()`` is AnyIO's ``current_time()`` plus the offset
    ``advance`` adds; ``now()`` maps it to UTC wall time from the moment the
    clock was made. Real clocks keep the two in step; trio's MockClock makes
    both jump together.
    """

    def __init__(self) -> None:
        self._wall0 = datetime.now(UTC)
        self._mono0 = anyio.current_time()
        self._offset = 0.0
        self._changed = anyio.Event()
        self.on_advance: Callable[[], None] | None = None

    def monotonic(self) -> float:
        return anyio.current_time() + self._offset

    def now(self) -> datetime:
        return self._wall0 + timedelta(seconds=self.monotonic() - self._mono0)

    def to_monotonic(self, when: datetime) -> float:
        return self._mono0 + (when - self._wall0).total_seconds()

    async def sleep(self, seconds: float) -> None:
        target = self.monotonic() + seconds
        while (left := target - self.monotonic()) > 0:
            with anyio.move_on_after(left):
                await self._changed.wait()

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper to look again."""
        self._offset += seconds
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
        if self.on_advance is not None:
            self.on_advance()


class _Queue:
    """One queue's due-time heap, idle workers and capacity accounting."""

    __slots__ = ("capacity", "heap", "idle", "space", "unprocessed")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int]] = []
        self.idle: deque[anyio.Event] = deque()
        self.unprocessed = 0
        self.capacity: int | None = None
        self.space: deque[anyio.Event] = deque()

    def push(self, due: float, job_id: int) -> None:
        heapq.heappush(self.heap, (due, job_id))
        if self.idle:
            self.idle.popleft().set()

    def wake_all(self) -> None:
        while self.idle:
            self.idle.popleft().set()

    def done_one(self) -> None:
        self.unprocessed -= 1
        if self.space:
            self.space.popleft().set()


class MemoryBackend(BackendCore):
    """A neoq backend that keeps jobs in memory. Get one from
    ``open_backend()`` (no connection string) or ``open_backend("memory://")``."""

    def __init__(self, task_group: TaskGroup, options: Options) -> None:
        super().__init__(
            task_group,
            transaction_timeout=options.transaction_timeout,
            shutdown_timeout=options.shutdown_timeout,
            recovery_callback=options.recovery_callback,
            logger=options.logger,
        )
        self.clock = MemoryClock()
        self.clock.on_advance = self._wake_all_queues
        self._cron_clock = self.clock
        self._jobs: dict[int, Job] = {}
        self._dead: dict[int, Job] = {}
        self._unique: dict[tuple[str, str, str], int] = {}
        self._queues: dict[str, _Queue] = {}
        self._last_tick: dict[str, datetime] = {}  # per cron queue
        self._next_id = 0
        self._in_flight = 0
        self._workers = 0
        self._workers_done = anyio.Event()
        self._workers_done.set()
        self._stopping = False
        self._progress: anyio.Event | None = None  # made on demand by _wait_progress

    async def _start_services(self) -> None:
        await anyio.lowlevel.checkpoint()

    # -- public API ------------------------------------------------------------------

    async def enqueue(
        self, job: Job, *, connection: psycopg.AsyncConnection[Any] | None = None
    ) -> str:
        """Add a job to its queue and return its id.

        Waits while the queue's handler has a ``max_queue_capacity`` and the
        queue holds that many unprocessed jobs.

        Raises:
            NoQueueError: the job has no queue.
            InvalidJobError: the payload is not a JSON object, a timestamp is
                naive, or ``max_retries`` is negative.
            DuplicateJobError: an unprocessed new job with the same queue and
                fingerprint exists.
            NoTransactionError: ``connection`` was given; the in-memory backend
                has no database.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        if connection is not None:
            raise NoTransactionError("the in-memory backend has no database connections")
        validate_job(job)
        text, fingerprint = encode_payload(job.queue, job.payload)
        fingerprint = job.fingerprint or fingerprint
        queue = self._queue(job.queue)
        key = (job.queue, fingerprint, "new")
        while True:
            if key in self._unique:
                raise DuplicateJobError(
                    f"an unprocessed job with fingerprint {fingerprint} "
                    f"is already on queue {job.queue!r}"
                )
            if queue.capacity is None or queue.unprocessed < queue.capacity:
                break
            await wait_in_line(queue.space)
        self._next_id += 1
        job_id = self._next_id
        now = self.clock.now()
        stored = Job(
            job.queue,
            # A JSON round trip, as PostgreSQL does: the handler gets a copy
            # with JSON's types (lists for tuples), never the caller's dict.
            None if text is None else json.loads(text),
            fingerprint=fingerprint,
            run_after=job.run_after or now,
            deadline=job.deadline,
            max_retries=23 if job.max_retries is None else job.max_retries,
        )
        _set(stored, id=str(job_id), created_at=now)
        self._jobs[job_id] = stored
        self._unique[key] = job_id
        queue.unprocessed += 1
        queue.push(self.clock.to_monotonic(stored.run_after or now), job_id)
        return str(job_id)

    async def start(self, handler: Handler) -> None:
        """Start processing ``handler.queue`` (see ``PostgresBackend.start``).

        Raises:
            ConfigurationError: the queue is empty or already has a handler,
                or ``job_timeout`` exceeds ``transaction_timeout``.
            NeoqError: the backend is shut down.
        """
        self._register(handler)
        queue = self._queue(handler.queue)
        queue.capacity = handler.max_queue_capacity
        self._spawn_workers(lambda: self._work(queue, handler), handler.concurrency)
        await anyio.lowlevel.checkpoint()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AnyioConnection]:
        """Always raises ``NoTransactionError``: there is no database."""
        raise NoTransactionError("the in-memory backend has no database connections")
        yield  # pragma: no cover

    def statistics(self) -> BackendStatistics:
        """Queues, jobs running now; no pool."""
        return BackendStatistics(
            queues=tuple(self._handlers),
            jobs_in_flight=self._in_flight,
            pool=None,
            listener_reconnects=0,
        )

    # -- workers ---------------------------------------------------------------------

    async def _work(self, queue: _Queue, handler: Handler) -> None:
        """One worker: run due jobs of ``queue`` until shutdown.

        Job timeouts use one cancel scope per worker instead of one per job
        (a scope with a deadline costs more than a no-op job): its deadline
        is moved only when it would fire before the running job's timeout,
        to that timeout plus a little slack, so a job is cancelled between
        ``job_timeout`` and ``job_timeout`` + 1 % (at most 50 ms) after it
        started. When the scope fires, the job it cut short fails with
        ``JobTimeoutError`` and the worker goes on with a new scope.
        """
        self._workers += 1
        self._workers_done = anyio.Event() if self._workers == 1 else self._workers_done
        heap, clock = queue.heap, self.clock
        timeout = handler.timeout_seconds
        slack = 0.0 if timeout is None else min(timeout / 100, 0.05)
        running: tuple[Job, Job] | None = None  # (stored job, the handler's view)
        streak = 0
        try:
            while not self._stopping:
                with anyio.CancelScope() as timer:
                    while not self._stopping:
                        if not (heap and heap[0][0] <= clock.monotonic()):
                            timer.deadline = math.inf  # idle: nothing to time out
                            await self._idle_wait(queue)
                            continue
                        job = self._jobs.get(heapq.heappop(heap)[1])
                        if job is None or job.status == "processed":
                            self._notify_progress()  # drain() may be waiting on it
                            continue
                        seen = self._begin(queue, job)
                        if seen is None:
                            continue
                        if timeout is not None:
                            due = anyio.current_time() + timeout
                            if not due <= timer.deadline <= due + slack:
                                timer.deadline = due + slack
                        running = (job, seen)
                        self._in_flight += 1
                        exc = await run_handler(handler, seen)
                        self._in_flight -= 1
                        running = None
                        callback = self._finish(queue, handler, job, seen, exc)
                        if callback is not None and exc is not None:  # exc: for mypy
                            timer.deadline = math.inf
                            await call_recover(callback, seen, exc, self._logger)
                        # Let other tasks run now and then, as database round
                        # trips would: a no-op handler never yields by itself.
                        streak += 1
                        if streak == _STREAK:
                            streak = 0
                            await anyio.lowlevel.checkpoint()
                if running is not None:  # the timer cut the running job short
                    job, seen = running
                    running = None
                    self._in_flight -= 1
                    late = JobTimeoutError(f"the job ran past its job_timeout of {timeout:g} s")
                    callback = self._finish(queue, handler, job, seen, late)
                    if callback is not None:
                        await call_recover(callback, seen, late, self._logger)
        except BaseException:
            if running is not None:  # cancelled at shutdown: the job stays queued as it was
                self._in_flight -= 1
                queue.push(clock.monotonic(), int(running[0].id or 0))
            raise
        finally:
            self._workers -= 1
            if self._workers == 0:
                self._workers_done.set()

    async def _idle_wait(self, queue: _Queue) -> None:
        """Sleep until the queue's earliest job is due, or a wake-up."""
        heap = queue.heap
        # Woken by a new job, advance() or shutdown.
        await wait_in_line(queue.idle, heap[0][0] - self.clock.monotonic() if heap else math.inf)

    def _begin(self, queue: _Queue, job: Job) -> Job | None:
        """The job as its handler sees it, or None if it is past its deadline."""
        if job.deadline is not None and job.deadline <= self.clock.now():
            late = JobDeadlineError(f"the job's deadline {job.deadline.isoformat()} has passed")
            self._bury(queue, job, job.retries, describe_error(late))
            self._logger.warning("job %s on queue %s not run: %s", job.id, job.queue, late)
            return None
        if job.status == "failed":  # this run is a retry
            return job._replace(retries=job.retries + 1)
        return job

    def _finish(
        self, queue: _Queue, handler: Handler, job: Job, seen: Job, exc: BaseException | None
    ) -> RecoverCallback | None:
        """Record a run's outcome; returns the recover callback to call, if any."""
        retries = seen.retries
        old_key = (job.queue, job.fingerprint or "", job.status)
        self._notify_progress()
        if exc is None:
            self._unique.pop(old_key, None)
            self._jobs[int(job.id or 0)] = job._replace(
                status="processed", ran_at=self.clock.now(), error=None, retries=retries
            )
            queue.done_one()
            return None
        decision = decide_failure(retries, job.max_retries)
        message = describe_error(exc)
        if decision.dead:
            self._bury(queue, job, retries, message)
        else:
            self._unique.pop(old_key, None)
            ran_at = self.clock.now()
            run_after = ran_at + timedelta(seconds=decision.delay)
            self._jobs[int(job.id or 0)] = job._replace(
                status="failed", ran_at=ran_at, error=message, retries=retries, run_after=run_after
            )
            self._unique[(job.queue, job.fingerprint or "", "failed")] = int(job.id or 0)
            queue.push(self.clock.to_monotonic(run_after), int(job.id or 0))
        self._logger.error(
            "job %s on queue %s failed (%s): %s",
            job.id,
            job.queue,
            "moved to dead jobs" if decision.dead else f"retry in {decision.delay:g} s",
            message,
        )
        return handler.recover_callback or self._recovery_callback

    def _bury(self, queue: _Queue, job: Job, retries: int, message: str) -> None:
        job_id = int(job.id or 0)
        self._unique.pop((job.queue, job.fingerprint or "", job.status), None)
        del self._jobs[job_id]
        self._dead[job_id] = job._replace(
            status="failed", error=message, retries=retries, created_at=self.clock.now()
        )
        queue.done_one()
        self._notify_progress()

    def _notify_progress(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    # -- internals -------------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue()
        return queue

    async def _enqueue_tick(self, queue: str, tick: datetime) -> bool:
        # One process, whose ticks only move forward: a tick is claimed the
        # first time it is seen.
        last = self._last_tick.get(queue)
        if last is not None and tick <= last:
            return False
        self._last_tick[queue] = tick
        await self.enqueue(Job(queue, {"tick": tick.astimezone(UTC).isoformat()}))
        return True

    def _stop_intake(self) -> None:
        self._stopping = True
        self._wake_all_queues()

    def _wake_all_queues(self) -> None:
        for queue in self._queues.values():
            queue.wake_all()

    async def _wait_workers(self) -> None:
        await self._workers_done.wait()

    # -- hooks for neoq_anyio.testing ------------------------------------------------------

    def _has_due(self) -> bool:
        """Whether a job is due now on a queue that has a handler (the heads of
        the heaps say; workers pop entries of finished jobs and notify)."""
        now = self.clock.monotonic()
        return any(
            (heap := self._queues[name].heap) and heap[0][0] <= now for name in self._handlers
        )

    async def _wait_progress(self) -> None:
        if self._progress is None:
            self._progress = anyio.Event()
        await self._progress.wait()


def _set(job: Job, **fields: Any) -> None:
    """Update fields of a job this backend owns (its stored copy)."""
    for name, value in fields.items():
        object.__setattr__(job, name, value)
