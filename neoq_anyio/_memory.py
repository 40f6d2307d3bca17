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
queue holds that many unprocessed jobs (as Go neoq's memory backend does),
and ``enqueue_many`` adds such a queue's jobs one at a time as room frees;
connection options are accepted and ignored. Lease mode runs with
PostgreSQL's observable rules (see ``_work``), without heartbeats: in one
process a lease cannot be lost.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import deque
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from logging import DEBUG
from typing import TYPE_CHECKING, Any, Never

import anyio
import anyio.lowlevel

from ._backend import Backend, BackendStatistics
from ._batch import encode_batch
from ._cron import WallClock
from ._exceptions import ConfigurationError, DuplicateJobError, NoJobError, NoTransactionError
from ._execution import WorkerTimer, report, run_handler
from ._fingerprint import encode_payload
from ._models import Job, QueueStats
from ._outcome import Outcome, as_run, decide, refuse_to_run
from ._sync import wait_in_line

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence
    from contextlib import AbstractAsyncContextManager

    import psycopg

    from ._backend import Options
    from ._models import Handler, JobStatus, RecoverCallback

__all__ = ["MemoryBackend", "MemoryClock"]

_COUNTED = ("due", "scheduled", "running", "failed", "processed", "dead")
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
    """One queue's due-time heap, idle workers, capacity accounting and pause.

    Heap entries are ``(due, number, id)``: the job's number breaks ties, so
    jobs due together run in the order they were enqueued. The workers of a
    paused queue stay idle until it is resumed.
    """

    __slots__ = (
        "capacity",
        "heap",
        "idle",
        "paused",
        "prioritized",
        "ready",
        "space",
        "unprocessed",
    )

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, str, int]] = []
        # Due entries, in claim order, once a job of nonzero priority is queued:
        # ``(-priority, due, number, id)``.
        self.ready: list[tuple[int, float, int, str]] = []
        self.prioritized = 0  # entries of a nonzero priority in either heap
        self.idle: deque[anyio.Event] = deque()
        self.unprocessed = 0
        self.capacity: int | None = None
        self.space: deque[anyio.Event] = deque()
        self.paused = False

    def push(self, due: float, job: Job) -> None:
        assert job.id is not None  # a stored job
        heapq.heappush(self.heap, (due, int(job.id), job.id, job.priority))
        if job.priority:
            self.prioritized += 1
        if self.idle:
            self.idle.popleft().set()

    def has_due(self, now: float) -> bool:
        return bool(self.ready) or bool(self.heap and self.heap[0][0] <= now)

    def next_due_in(self, now: float) -> float:
        """Seconds until the earliest entry is due (0: one is)."""
        if self.ready:
            return 0.0
        return self.heap[0][0] - now if self.heap else math.inf

    def pop_due(self, now: float) -> tuple[float, str]:
        """The next due entry in claim order: higher priority first, then
        earlier due, then enqueued first. Only while jobs of a nonzero
        priority are queued does this sort due entries by priority; the
        common case costs one heap operation."""
        heap, ready = self.heap, self.ready
        if not self.prioritized and not ready:
            due, _, job_id, _ = heapq.heappop(heap)
            return due, job_id
        while heap and heap[0][0] <= now:
            due, number, job_id, priority = heapq.heappop(heap)
            heapq.heappush(ready, (-priority, due, number, job_id))
        negated, due, _, job_id = heapq.heappop(ready)
        if negated:
            self.prioritized -= 1
        return due, job_id

    def wake_all(self) -> None:
        while self.idle:
            self.idle.popleft().set()

    def done_one(self) -> None:
        self.unprocessed -= 1
        if self.space:
            self.space.popleft().set()


class MemoryBackend(Backend):
    """The backend that keeps jobs in memory. Get one from ``open_backend()``
    (no connection string) or ``open_backend("memory://")``; its methods are
    ``Backend``'s.

    Attributes:
        clock: the backend's time (``MemoryClock``), which
            ``neoq_anyio.testing.fast_forward`` moves ahead.
    """

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.clock = MemoryClock()
        self.clock.on_advance = self._wake_all_queues
        self._cron_clock = self.clock
        self._jobs: dict[str, Job] = {}
        self._dead: dict[str, Job] = {}
        self._unique: dict[tuple[str, str, str], str] = {}
        self._queues: dict[str, _Queue] = {}
        self._last_tick: dict[str, datetime] = {}  # per cron queue
        self._next_id = 0
        self._workers = 0
        self._workers_done = anyio.Event()
        self._workers_done.set()
        self._stopping = False
        self._progress: anyio.Event | None = None  # made on demand by _wait_drained
        self._running_ids: set[str] = set()  # jobs whose handler runs now
        # Lease-mode jobs running now, and their workers' timer scopes, which
        # cancel_job cancels; _cancelling holds the ids it cancelled.
        self._leases: dict[str, anyio.CancelScope] = {}
        self._cancelling: set[str] = set()
        # Jobs retry_job made due at another time than their heap entry says:
        # only their entries are checked for staleness (see _stale).
        self._rescheduled: set[str] = set()

    # -- the public API ----------------------------------------------------------------

    async def _enqueue(self, job: Job, connection: psycopg.AsyncConnection[Any] | None) -> str:
        if connection is not None:
            raise NoTransactionError("the in-memory backend has no database connections")
        text, fingerprint = encode_payload(job.queue, job.payload)
        fingerprint = job.fingerprint or fingerprint
        job_id = await self._add(job, text, fingerprint)
        if job_id is None:
            raise DuplicateJobError(
                f"an unprocessed job with fingerprint {fingerprint} "
                f"is already on queue {job.queue!r}"
            )
        return job_id

    async def _enqueue_many(
        self, jobs: Sequence[Job], connection: psycopg.AsyncConnection[Any] | None
    ) -> list[str | None]:
        if connection is not None:
            raise NoTransactionError("the in-memory backend has no database connections")
        encoded = encode_batch(jobs)  # every payload, before anything is stored
        # One by one, in order: a job repeating an earlier one of the batch
        # finds it stored, as on PostgreSQL.
        return [
            await self._add(job, text, fingerprint)
            for job, (text, fingerprint) in zip(jobs, encoded, strict=True)
        ]

    async def _add(self, job: Job, text: str | None, fingerprint: str) -> str | None:
        """Store a checked job with its encoded payload; ``None`` if an
        unprocessed job with the same queue and fingerprint is new already.
        Waits while the queue is at its ``max_queue_capacity``."""
        queue = self._queue(job.queue)
        key = (job.queue, fingerprint, "new")
        while True:
            if key in self._unique:
                return None
            if queue.capacity is None or queue.unprocessed < queue.capacity:
                break
            await wait_in_line(queue.space)
        self._next_id += 1
        now = self.clock.now()
        stored = job._evolve(
            id=str(self._next_id),
            # A JSON round trip, as PostgreSQL does: the handler gets a copy
            # with JSON's types (lists for tuples), never the caller's dict.
            payload=None if text is None else json.loads(text),
            fingerprint=fingerprint,
            run_after=job.run_after or now,
            max_retries=23 if job.max_retries is None else job.max_retries,
            created_at=now,
        )
        assert stored.id is not None
        assert stored.run_after is not None
        self._jobs[stored.id] = stored
        self._unique[key] = stored.id
        queue.unprocessed += 1
        queue.push(self.clock.to_monotonic(stored.run_after), stored)
        return stored.id

    async def start(self, handler: Handler) -> None:
        if handler.rate_limit is not None:
            raise ConfigurationError(
                f"handler for queue {handler.queue!r}: rate_limit needs the PostgreSQL backend"
            )
        self._register(handler)
        queue = self._queue(handler.queue)
        queue.capacity = handler.max_queue_capacity
        recover = self._recover_callback(handler)
        # One process is the whole fleet here: the global bound is the local one.
        workers = min(handler.concurrency, handler.global_concurrency or handler.concurrency)
        self._spawn_workers(lambda: self._work(queue, handler, recover), workers)
        self._log_started(handler)
        await anyio.lowlevel.checkpoint()

    # -- managing jobs -------------------------------------------------------------------

    async def _get_job(self, job_id: str) -> Job | None:
        await anyio.lowlevel.checkpoint()
        return self._jobs.get(job_id) or self._dead.get(job_id)

    async def _list_jobs(
        self, *, queue: str | None, status: JobStatus | None, limit: int, before_id: int | None
    ) -> list[Job]:
        await anyio.lowlevel.checkpoint()
        found = [
            job
            for jobs in (self._jobs, self._dead)
            for job in jobs.values()
            if (queue is None or job.queue == queue)
            and (status is None or job.status == status)
            and (before_id is None or int(job.id or 0) < before_id)
        ]
        found.sort(key=lambda job: int(job.id or 0), reverse=True)
        return found[:limit]

    async def _retry_job(self, job_id: str) -> Job:
        await anyio.lowlevel.checkpoint()
        job = self._jobs.get(job_id)
        if job is None:
            dead = self._dead.get(job_id)
            if dead is None:
                raise NoJobError(f"no job {job_id!r}")
            return self._reschedule(dead, status="new", was_dead=True)
        if job_id in self._running_ids:
            return job  # being run: left as it is
        return self._reschedule(job, status="new" if job.status == "processed" else job.status)

    def _reschedule(self, job: Job, *, status: JobStatus, was_dead: bool = False) -> Job:
        """Make ``job`` due now with ``status`` (``retry_job``)."""
        assert job.id is not None
        queue = self._queue(job.queue)
        key = (job.queue, job.fingerprint or "", status)
        if self._unique.get(key, job.id) != job.id:
            raise DuplicateJobError(
                f"cannot retry job {job.id}: an unprocessed job with the same queue, "
                "fingerprint and status is queued"
            )
        old_key = (job.queue, job.fingerprint or "", job.status)
        if not was_dead and self._unique.get(old_key) == job.id:
            del self._unique[old_key]
        now = self.clock.now()
        changes: dict[str, Any] = {"status": status, "run_after": now}
        if was_dead:
            del self._dead[job.id]
            changes["ran_at"] = None
        if was_dead or job.status == "processed":
            queue.unprocessed += 1
        retried = job._evolve(**changes)
        self._jobs[job.id] = retried
        self._unique[key] = job.id
        self._rescheduled.add(job.id)
        queue.push(self.clock.to_monotonic(now), retried)
        return retried

    async def _cancel_job(self, job_id: str) -> bool:
        await anyio.lowlevel.checkpoint()
        job = self._jobs.get(job_id)
        if job is None or job.status == "processed":
            return False
        if job_id in self._running_ids:
            # A lease-mode job is cancelled now (PostgreSQL: at its next
            # heartbeat); its worker moves it to the dead jobs. A
            # transaction-mode job cannot be cancelled.
            scope = self._leases.get(job_id)
            if scope is None:
                return False
            self._cancelling.add(job_id)
            scope.cancel(reason="cancel_job")
            return True
        self._unique.pop((job.queue, job.fingerprint or "", job.status), None)
        del self._jobs[job_id]
        self._rescheduled.discard(job_id)
        self._dead[job_id] = job._evolve(
            status="dead", error="cancelled", created_at=self.clock.now()
        )
        self._queue(job.queue).done_one()
        self._notify_progress()
        return True

    async def _delete_job(self, job_id: str) -> bool:
        await anyio.lowlevel.checkpoint()
        if self._dead.pop(job_id, None) is not None:
            return True
        job = self._jobs.get(job_id)
        if job is None or job_id in self._running_ids:
            return False
        del self._jobs[job_id]
        self._rescheduled.discard(job_id)
        if job.status != "processed":
            self._unique.pop((job.queue, job.fingerprint or "", job.status), None)
            self._queue(job.queue).done_one()
        self._notify_progress()
        return True

    async def _queue_stats(self) -> list[QueueStats]:
        await anyio.lowlevel.checkpoint()
        now = self.clock.now()
        counts: dict[str, dict[str, int]] = {}
        oldest: dict[str, datetime] = {}
        for job in self._jobs.values():
            count = counts.setdefault(job.queue, dict.fromkeys(_COUNTED, 0))
            due = job.run_after is None or job.run_after <= now
            if job.status == "processed":
                count["processed"] += 1
            elif job.status == "running":  # leased (lease mode)
                count["running"] += 1
            elif due:
                count["due"] += 1
                assert job.run_after is not None
                if job.queue not in oldest or job.run_after < oldest[job.queue]:
                    oldest[job.queue] = job.run_after
            else:
                count["failed" if job.status == "failed" else "scheduled"] += 1
        for job in self._dead.values():
            counts.setdefault(job.queue, dict.fromkeys(_COUNTED, 0))["dead"] += 1
        for name, queue in self._queues.items():
            if queue.paused:  # listed even before any job came
                counts.setdefault(name, dict.fromkeys(_COUNTED, 0))
        return [
            QueueStats(
                queue=name,
                **count,
                oldest_due_seconds=(now - oldest[name]).total_seconds() if name in oldest else None,
                paused=name in self._queues and self._queues[name].paused,
            )
            for name, count in sorted(counts.items())
        ]

    async def _set_paused(self, queue: str, *, paused: bool) -> None:
        await anyio.lowlevel.checkpoint()
        state = self._queue(queue)
        was_paused, state.paused = state.paused, paused
        if was_paused and not paused:
            state.wake_all()  # to take the jobs that came due meanwhile
        self._notify_progress()  # drain() no longer waits for a paused queue

    def _stale(self, job: Job, due: float) -> bool:
        """Whether a heap entry of a rescheduled job is an old one."""
        assert job.run_after is not None
        return due != self.clock.to_monotonic(job.run_after)

    def connection(self) -> AbstractAsyncContextManager[Never]:
        return _no_connection()

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(
            queues=tuple(self._handlers),
            jobs_in_flight=len(self._running_ids),
            pool=None,
            listener_reconnects=0,
        )

    # -- workers -------------------------------------------------------------------------

    async def _work(self, queue: _Queue, handler: Handler, recover: RecoverCallback | None) -> None:
        """One worker: run due jobs of ``queue`` until shutdown.

        Job timeouts use a ``WorkerTimer`` (one cancel scope per worker, not
        per job). When it fires, the job it cut short fails with
        ``JobTimeoutError`` and the worker goes on with a new scope.

        Lease mode keeps PostgreSQL's observable rules: while its handler
        runs, the stored job reads ``running`` with the ``retries`` of the
        run (attempts count at the claim), and a job cancelled at shutdown is
        released as it was before the claim. In one process a lease cannot
        be lost (no other worker can claim the job, and the worker cannot die
        without the process), so there are no heartbeats and no expiry;
        ``cancel_job`` cancels the handler at once through the timer's scope.
        """
        self._workers += 1
        self._workers_done = anyio.Event() if self._workers == 1 else self._workers_done
        clock = self.clock
        rescheduled, running_ids = self._rescheduled, self._running_ids
        jobs, leases = self._jobs, self._leases
        lease = handler.execution == "lease"
        backoff = handler.backoff
        timer = WorkerTimer(handler.timeout_seconds)
        running: Job | None = None  # the stored job whose handler runs now
        observer = self._observer
        observed: Any = None  # observer's state for the running job
        log = self._log
        streak = 0
        try:
            while not self._stopping:
                with timer.scope() as scope:
                    while not self._stopping:
                        now = clock.monotonic()
                        if queue.paused or not queue.has_due(now):
                            timer.pause()  # idle: nothing to time out
                            await self._idle_wait(queue)
                            continue
                        due, job_id = queue.pop_due(now)
                        job = jobs.get(job_id)
                        if (
                            job is None
                            or job.status == "processed"
                            or (rescheduled and job_id in rescheduled and self._stale(job, due))
                        ):
                            self._notify_progress()  # drain() may be waiting on it
                            continue
                        # now() only for a job with a deadline: it costs more than a no-op job.
                        if job.deadline is not None and (
                            refused := refuse_to_run(job, clock.now())
                        ):
                            await self._conclude(queue, job, job, refused, recover)
                            continue
                        seen = as_run(job)
                        timer.start()
                        running = job  # as before the claim: a release restores it
                        running_ids.add(job_id)
                        if lease:
                            jobs[job_id] = seen._evolve(status="running")
                            leases[job_id] = scope
                        if observer is not None:
                            observed = observer.job_started(seen)
                        exc = await run_handler(handler, seen)
                        if timer.fired():
                            # The handler caught its timeout's cancellation and
                            # went on: still a timeout, concluded below, out of
                            # the cancelled scope.
                            break
                        running_ids.discard(job_id)
                        running = None
                        if lease:
                            del leases[job_id]
                        outcome = decide(seen, exc, backoff)
                        self._store_outcome(queue, job, outcome)
                        # A success is reported only to whoever listens: the
                        # observer, or a DEBUG log (as PostgreSQL's workers log it).
                        if (
                            exc is not None
                            or observer is not None
                            or log.logger.isEnabledFor(DEBUG)
                        ):
                            timer.pause()  # the recover callback is not timed
                            state, observed = observed, None
                            await report(
                                outcome, seen, recover, log, observer=observer, state=state
                            )
                        # Let other tasks run now and then, as database round
                        # trips would: a no-op handler never yields by itself.
                        streak += 1
                        if streak == _STREAK:
                            streak = 0
                            await anyio.lowlevel.checkpoint()
                if running is not None:  # the timer (or cancel_job) cut the running job short
                    job, running = running, None
                    assert job.id is not None
                    running_ids.discard(job.id)
                    seen = as_run(job)
                    state, observed = observed, None
                    if lease:
                        del leases[job.id]
                    if job.id in self._cancelling:  # lease mode only
                        self._cancelling.discard(job.id)
                        self._conclude_cancelled(queue, job, seen, state)
                    else:
                        outcome = decide(seen, timer.error(), backoff)
                        await self._conclude(queue, job, seen, outcome, recover, state)
        except BaseException:
            if running is not None:  # cancelled at shutdown: the job stays queued as it was
                released = running.id
                assert released is not None
                running_ids.discard(released)
                if lease:  # released: due again at once, as before the claim
                    leases.pop(released, None)
                    self._cancelling.discard(released)
                    jobs[released] = running
                assert running.run_after is not None
                # Its own due time (passed), not now: a retried job's entry
                # must match its run_after, or _stale drops it.
                queue.push(clock.to_monotonic(running.run_after), running)
                if observer is not None and observed is not None:
                    observer.job_abandoned(as_run(running), observed)
            raise
        finally:
            self._workers -= 1
            if self._workers == 0:
                self._workers_done.set()

    async def _idle_wait(self, queue: _Queue) -> None:
        """Sleep until the queue's earliest job is due, or a wake-up."""
        due = math.inf if queue.paused else queue.next_due_in(self.clock.monotonic())
        # Woken by a new job, advance(), resume_queue() or shutdown.
        await wait_in_line(queue.idle, due)

    async def _conclude(
        self,
        queue: _Queue,
        job: Job,
        seen: Job,
        outcome: Outcome,
        recover: RecoverCallback | None,
        state: Any = None,
    ) -> None:
        """Store a run's outcome (the stored ``job``, as its handler ``seen`` it),
        then report it (``state``: the observer's, for a job that ran)."""
        self._store_outcome(queue, job, outcome)
        if outcome.kind != "processed" or self._observer is not None:
            await report(outcome, seen, recover, self._log, observer=self._observer, state=state)

    def _conclude_cancelled(self, queue: _Queue, job: Job, seen: Job, state: Any) -> None:
        """Move a lease-mode job that ``cancel_job`` cut short to the dead jobs,
        with the error ``cancelled``; its run counted. Not a failure of the
        handler: logged at INFO, and no recover callback."""
        outcome = Outcome("dead", seen.retries, "cancelled")
        self._store_outcome(queue, job, outcome)
        extra = {"job_id": job.id, "queue": job.queue}
        self._log.info("job %s on queue %s cancelled while running", job.id, job.queue, extra=extra)
        if self._observer is not None:
            self._observer.job_finished(seen, outcome, state)

    def _store_outcome(self, queue: _Queue, job: Job, outcome: Outcome) -> None:
        assert job.id is not None
        self._unique.pop((job.queue, job.fingerprint or "", job.status), None)
        self._notify_progress()
        now = self.clock.now()
        if outcome.kind == "processed":
            self._jobs[job.id] = job._evolve(
                status="processed", ran_at=now, error=None, retries=outcome.retries
            )
            self._rescheduled.discard(job.id)
            queue.done_one()
        elif outcome.kind == "retry":
            run_after = now + timedelta(seconds=outcome.delay)
            failed = job._evolve(
                status="failed",
                ran_at=now,
                error=outcome.error,
                retries=outcome.retries,
                run_after=run_after,
            )
            self._jobs[job.id] = failed
            self._unique[(job.queue, job.fingerprint or "", "failed")] = job.id
            queue.push(self.clock.to_monotonic(run_after), failed)
        elif outcome.kind == "snooze":  # as it was before the run, due later
            run_after = now + timedelta(seconds=outcome.delay)
            snoozed = job._evolve(retries=outcome.retries, run_after=run_after)
            self._jobs[job.id] = snoozed
            self._unique[(job.queue, job.fingerprint or "", job.status)] = job.id
            queue.push(self.clock.to_monotonic(run_after), snoozed)
        else:
            del self._jobs[job.id]
            self._rescheduled.discard(job.id)
            self._dead[job.id] = job._evolve(
                status="dead", error=outcome.error, retries=outcome.retries, created_at=now
            )
            queue.done_one()

    def _notify_progress(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    # -- the backend's hooks -------------------------------------------------------------

    async def _start_services(self) -> None:
        if self._retains():
            await self._task_group.start(self._run_service, self._prune_periodically)
        await anyio.lowlevel.checkpoint()

    async def _prune(
        self, *, processed_age: float | None, dead_age: float | None
    ) -> tuple[int, int]:
        await anyio.lowlevel.checkpoint()
        now = self.clock.now()
        processed = dead = 0
        if processed_age is not None:
            cutoff = now - timedelta(seconds=processed_age)
            old = [
                job_id
                for job_id, job in self._jobs.items()
                if job.status == "processed" and job.ran_at is not None and job.ran_at < cutoff
            ]
            for job_id in old:
                del self._jobs[job_id]
            processed = len(old)
        if dead_age is not None:
            cutoff = now - timedelta(seconds=dead_age)
            gone = [
                job_id
                for job_id, job in self._dead.items()
                if job.created_at is not None and job.created_at < cutoff
            ]
            for job_id in gone:
                del self._dead[job_id]
            dead = len(gone)
        return processed, dead

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
        # Unobserved: Backend._observed_tick counts it.
        await self._enqueue(Job(queue, {"tick": tick.astimezone(UTC).isoformat()}), None)
        return True

    def _stop_intake(self) -> None:
        self._stopping = True
        self._wake_all_queues()

    def _wake_all_queues(self) -> None:
        for queue in self._queues.values():
            queue.wake_all()

    async def _wait_workers(self) -> None:
        await self._workers_done.wait()

    async def _wait_drained(self) -> None:
        while self._has_due() or self._running_ids:
            if self._progress is None:
                self._progress = anyio.Event()
            await self._progress.wait()

    def _has_due(self) -> bool:
        """Whether a job is due now on a queue that has a handler (the heads of
        the heaps say; workers pop entries of finished jobs and notify)."""
        now = self.clock.monotonic()
        return any(
            not (queue := self._queues[name]).paused and queue.has_due(now)
            for name in self._handlers
        )

    async def _stored_jobs(self, queue: str | None, *, dead: bool) -> list[Job]:
        jobs = self._dead if dead else self._jobs
        return [j for j in jobs.values() if queue is None or j.queue == queue]

    async def _fast_forward(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await anyio.lowlevel.checkpoint()


@asynccontextmanager
async def _no_connection() -> AsyncIterator[Never]:
    raise NoTransactionError("the in-memory backend has no database connections")
    yield  # pragma: no cover
