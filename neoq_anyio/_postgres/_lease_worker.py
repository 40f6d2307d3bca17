"""Running the jobs of one queue in lease mode (``Handler(..., execution="lease")``).

One claimer per queue leases due jobs in batches, up to the handler's free
slots, and runs each in a task of its own; a running job holds no
connection. Three companions share the claimer's task group:

- the heartbeat extends the running jobs' leases every third of
  ``lease_duration``, in one statement, and cancels a handler whose lease
  is lost (taken over elsewhere, or not extended in time because the
  database is unreachable);
- the acknowledger writes successes in batches: whatever finished while the
  previous batch was being written;
- the rescuer claims jobs whose lease expired (their worker died), every
  ``job_check_interval``, looking only at leases that expired since its
  last look (and at all of them once a minute), so it never walks the whole
  lease index.

Failures and dead jobs are written one by one, as they come (they are rare
and carry a message). On shutdown, jobs still running past
``shutdown_timeout`` are cancelled and their leases given back: due again
at once, with ``retries`` as before the claim.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from datetime import UTC, datetime, timedelta
from functools import partial
from logging import DEBUG
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
from psycopg import pq

from neoq_anyio._exceptions import DatabaseError, LeaseLostError, PoolTimeoutError
from neoq_anyio._execution import WorkerTimer, report, run_handler
from neoq_anyio._outcome import after_failed_record, decide, refuse_to_run
from neoq_anyio._sync import event_factory

from ._lazy_transaction import LazyTransaction
from ._leases import limits_of
from ._wakeups import Wake, Wakeups

if TYPE_CHECKING:
    from collections.abc import Callable

    from neoq_anyio._log import BackendLog
    from neoq_anyio._models import Handler
    from neoq_anyio._observe import Observer
    from neoq_anyio._outcome import Outcome
    from neoq_anyio._pg._connection import AnyioConnection
    from neoq_anyio._pg._pool import ConnectionPool

    from ._leases import Lease, LeaseStore
    from ._watermark import Watermark

__all__ = ["LeaseWorkers"]

_OK = pq.ConnStatus.OK
_OPEN = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)

BATCH = 100
"""Most jobs one claim leases."""

_ERROR_PAUSE = 1.0  # seconds the claimer rests after a database error, doubling
_MAX_ERROR_PAUSE = 30.0
_RESCAN = 60.0  # seconds between looks at every expired lease, not just the newest
_SINCE_SLACK = 2.0  # seconds the rescuer looks back past its last look
_STREAK = 8  # jobs a worker runs back to back before it yields to the loop
_LIMIT_POLL = 0.05  # seconds before a claim held back by global_concurrency tries again
_BEAT_RETRY = 0.5  # seconds before a failed heartbeat is tried again
_FINAL_WRITES = 5.0  # seconds shutdown may spend writing acknowledgements and releases


class _Run:
    """One leased job in this process, from claim to acknowledgement."""

    __slots__ = ("lease", "locked", "lost", "observed", "scope", "tx", "valid_until")

    def __init__(self, lease: Lease, valid_until: float) -> None:
        self.lease = lease
        self.valid_until = valid_until  # AnyIO's clock: the lease holds until then at least
        self.scope: anyio.CancelScope | None = None  # its worker's, while the handler runs
        self.lost = False
        self.locked = False  # its transaction is open: the row lock guards it
        self.observed: Any = None
        self.tx: LazyTransaction | None = None


class LeaseWorkers:
    """Claims and runs the lease-mode jobs of one queue in this process.

    Args:
        handler: what to run (``execution="lease"``).
        leases: runs the lease SQL.
        pool: where job transactions get their connection.
        watermark: where this queue's claims start.
        recover: the recover callback for handler errors, if any.
        on_retry: ``on_retry(job_id, queue, delay)`` after a failure is
            scheduled for a retry ``delay`` seconds away.
        broke_transaction: why a handler that returned left its transaction
            unusable, if it did (``JobStore.handler_broke_transaction``).
        check_interval: seconds between the rescuer's looks.
        log: the backend's log.
        observer: told of each job's start and outcome (metrics, tracing).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        leases: LeaseStore,
        pool: ConnectionPool,
        watermark: Watermark,
        recover: Any,
        on_retry: Callable[[str, str, float], None],
        broke_transaction: Callable[[AnyioConnection], DatabaseError | None],
        check_interval: float,
        log: BackendLog,
        observer: Observer | None = None,
    ) -> None:
        self.handler = handler
        self.wakeups = Wakeups()
        self._leases = leases
        self._pool = pool
        self._watermark = watermark
        self._recover = recover
        self._on_retry = on_retry
        self._broke = broke_transaction
        self._check_interval = check_interval
        self._log = log
        self._observer = observer
        self._timeout = handler.timeout_seconds
        self._lease = handler.lease_seconds
        self._runs: dict[str, _Run] = {}  # leases held (waiting or running), by id
        self._ready: deque[_Run] = deque()  # claimed, waiting for a worker
        self._idle: deque[anyio.Event] = deque()  # workers waiting for a claimed job
        self._waking = False  # an idle worker was woken and has not looked yet
        self._closing = False  # workers return once idle
        self._slots_wanted = 0
        self._slots_freed: anyio.Event | None = None  # set once _slots_wanted are free
        # One claim at a time: slots are counted before it. fast_acquire: the
        # claimer alone takes it, mostly, and need not yield to the loop.
        self._claiming = anyio.Lock(fast_acquire=True)
        self._acks: list[_Run] = []  # successes waiting to be written
        self._acks_waiting = anyio.Event()
        self._acks_closing = False  # shutdown: write what is left, then return
        self._acks_written = anyio.Event()
        self._cut_short: list[Lease] = []  # cancelled by shutdown: leases to give back
        self._finished = anyio.Event()
        self._sweeps_seen = 0
        self._limits = limits_of(handler)
        self._limited_at = datetime.now(UTC)  # the database's time of the last limited claim

    @property
    def in_flight(self) -> int:
        """Jobs claimed and not yet finished here."""
        return len(self._runs)

    async def wait_stopped(self) -> None:
        """Return once the claimer and every job it started have returned."""
        await self._finished.wait()

    async def work(self) -> None:
        """Claim and run jobs until the queue stops; then write what is left."""
        try:
            async with anyio.create_task_group() as services:
                services.start_soon(self._heartbeat)
                services.start_soon(self._acknowledge)
                # Workers live as long as the queue: a task per job would
                # cost more than a no-op job.
                async with anyio.create_task_group() as workers:
                    for _ in range(self.handler.concurrency):
                        workers.start_soon(self._run_jobs)
                    services.start_soon(self._rescue)
                    try:
                        await self._claim()
                    finally:
                        self._stop_workers()
                # Let the acknowledger write what is left: cancelled mid-write,
                # it could not tell whether the batch was committed.
                self._acks_closing = True
                self._acks_waiting.set()
                await self._acks_written.wait()
                services.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + _FINAL_WRITES
                await self._final_writes()
            self._finished.set()

    # -- claiming --------------------------------------------------------------------

    async def _claim(self) -> None:
        errors = 0
        while True:
            wake = await self.wakeups.wait()
            if wake is Wake.STOP:
                return
            if wake is Wake.SWEEP and self.wakeups.sweeps != self._sweeps_seen:
                self._sweeps_seen = self.wakeups.sweeps  # jobs may be behind the watermark
                self._watermark.reset()
            wanted = 1
            while not self.wakeups.stopped:
                await self._wait_for_slots(wanted)
                mark = self.wakeups.mark()
                count = min(self.handler.concurrency - len(self._runs), BATCH)
                try:
                    async with self._claiming:
                        if self.wakeups.stopped:
                            return
                        if self.wakeups.paused:  # pause_queue(): wait() holds until resumed
                            break
                        claimed, wait = await self._claim_from_watermark(count)
                except (DatabaseError, PoolTimeoutError) as exc:
                    errors += 1
                    pause = min(_ERROR_PAUSE * 2 ** min(errors - 1, 10), _MAX_ERROR_PAUSE)
                    self._log.warning(
                        "queue %s: cannot claim jobs, trying again in %g s: %s",
                        self.handler.queue,
                        pause,
                        exc,
                    )
                    await self.wakeups.rest(pause)
                    self.wakeups.retry()
                    break
                errors = 0
                if wait is not None:  # a global limit held it back: not an empty queue
                    await self.wakeups.rest(wait)
                    continue
                if len(claimed) < count:
                    self.wakeups.found_nothing(mark)
                    break
                # A full batch: more are due. Wait for half the slots, not
                # one, so each claim leases many jobs; the claim then runs
                # while the other half of the jobs still run.
                wanted = max(1, min(BATCH, self.handler.concurrency) // 2)

    async def _claim_from_watermark(self, count: int) -> tuple[list[Lease], float | None]:
        """Lease up to ``count`` jobs after the watermark and start them, then,
        if too few were ahead of it, behind it (see ``_watermark``). Returns
        them, and, if a global limit held the claim back, how long to wait
        before the next."""
        if self._limits is not None:
            return await self._claim_limited(count)
        queue, watermark = self.handler.queue, self._watermark
        position = watermark.position
        claimed = await self._leases.claim(queue, count, self._lease, position)
        self._start_runs(claimed)
        if position is not None and len(claimed) < count:
            if claimed:  # let them start first: the look behind is rarely fruitful
                await anyio.lowlevel.checkpoint()
            # Paused since the first claim was sent: a claim sent now could
            # lease jobs enqueued after pause_queue() returned.
            if self.wakeups.paused or self.wakeups.stopped:
                return claimed, None
            more = await self._leases.claim(
                queue, count - len(claimed), self._lease, position, behind=True
            )
            self._start_runs(more)
            claimed += more
        return claimed, None

    async def _claim_limited(
        self, count: int, expired_since: datetime | float | None = None
    ) -> tuple[list[Lease], float | None]:
        """``_claim_from_watermark`` (or the rescuer's claim) within the queue's
        global limits, from the head of the queue (see ``_limits``)."""
        assert self._limits is not None
        limits = self._limits
        got = await self._leases.claim_limited(
            self.handler.queue, count, self._lease, limits, expired_since=expired_since
        )
        self._start_runs(got.leases)
        if not got.held_back:
            return got.leases, None
        self._limited_at = got.now
        if limits.rate is not None:
            per = limits.rate[1]
            wait = per - got.now.timestamp() % per  # the next window
            return got.leases, min(wait, _LIMIT_POLL) if limits.slots is not None else wait
        return got.leases, _LIMIT_POLL

    async def _wait_for_slots(self, wanted: int) -> None:
        while self.handler.concurrency - len(self._runs) < wanted and not self.wakeups.stopped:
            self._slots_wanted = wanted
            self._slots_freed = event = anyio.Event()
            await event.wait()

    def _free_slot(self, run: _Run) -> None:
        """``run`` is over here: its slot is free."""
        self._runs.pop(run.lease.id, None)
        event = self._slots_freed
        if event is not None and (
            self.handler.concurrency - len(self._runs) >= self._slots_wanted or self.wakeups.stopped
        ):
            self._slots_freed = None
            event.set()

    def _start_runs(self, claimed: list[Lease]) -> None:
        """Hand leased jobs to the workers; after shutdown began, give them back."""
        if not claimed:
            return
        valid_until = anyio.current_time() + self._lease  # measured before the claim returned
        self._watermark.advance(max([lease.position for lease in claimed]))
        if self._closing:
            self._cut_short += claimed
            return
        for lease in claimed:
            run = _Run(lease, valid_until)
            self._runs[lease.id] = run
            self._ready.append(run)
        self._wake_worker()

    def _wake_worker(self) -> None:
        """Wake one idle worker for the jobs waiting, unless one is waking:
        a worker that takes a job wakes the next if more wait (see
        ``_run_jobs``), so a batch of quick jobs wakes a few workers, not one
        per job, while slow ones still each get a worker at once."""
        if self._idle and not self._waking:
            self._waking = True
            self._idle.popleft().set()

    def _stop_workers(self) -> None:
        """Shutdown: idle workers return; jobs not started yet are given back."""
        self._closing = True
        while self._ready:
            run = self._ready.popleft()
            self._runs.pop(run.lease.id, None)
            self._cut_short.append(run.lease)
        while self._idle:
            self._idle.popleft().set()

    async def _rescue(self) -> None:
        """Claim jobs whose lease expired: their worker was lost."""
        since: datetime | float = -math.inf
        last_rescan = anyio.current_time()
        # Often enough to notice a lost worker soon after its leases lapse;
        # not every few milliseconds when lease_duration is long.
        interval = min(max(self._check_interval, self._lease / 10), self._lease)
        while True:
            await anyio.sleep(interval)
            free = min(self.handler.concurrency - len(self._runs), BATCH)
            if free <= 0 or self.wakeups.stopped or self.wakeups.paused:
                continue
            if anyio.current_time() - last_rescan > _RESCAN:
                since, last_rescan = -math.inf, anyio.current_time()
            try:
                async with self._claiming:
                    if self.wakeups.stopped or self.wakeups.paused:
                        continue
                    if self._limits is not None:
                        claimed, _ = await self._claim_limited(free, since)
                        now = self._limited_at
                    else:
                        now, claimed = await self._leases.claim_expired(
                            self.handler.queue, free, self._lease, since
                        )
                        self._start_runs(claimed)
            except (DatabaseError, PoolTimeoutError) as exc:
                self._log.warning(
                    "queue %s: cannot look for jobs whose worker was lost: %s",
                    self.handler.queue,
                    exc,
                )
                continue
            since = now - timedelta(seconds=_SINCE_SLACK)  # late commits
            if claimed:
                self._log.warning(
                    "queue %s: %d jobs whose worker was lost (lease expired) run again",
                    self.handler.queue,
                    len(claimed),
                )

    # -- running -----------------------------------------------------------------------

    async def _run_jobs(self) -> None:
        """One worker: run the claimed jobs handed to it, until shutdown.

        Job timeouts and lost leases use the worker's ``WorkerTimer`` scope
        (one per worker, not per job): a lost lease cancels it while that
        job's handler runs, and the worker goes on with a new scope.
        """
        timer = WorkerTimer(self._timeout)
        ready, observer = self._ready, self._observer
        new_event = event_factory()
        run: _Run | None = None
        started = False  # whether run's handler was called
        streak = 0
        try:
            while True:
                with timer.scope() as scope:
                    while True:
                        started = False
                        if not ready:
                            # No timer.pause() while idle: moving a deadline
                            # costs more than a no-op job. If it fires while
                            # the worker idles, the worker takes a new scope.
                            if self._closing:
                                return
                            await self._wait_idle(new_event())
                            continue
                        run = ready.popleft()
                        if ready:
                            self._wake_worker()
                        else:
                            self._ready_drained()
                        if run.lost:  # taken over while it waited
                            self._free_slot(run)
                            run = None
                            continue
                        job = run.lease.job
                        outcome = run.lease.refused()
                        # now() only for a job with a deadline: it costs more than a no-op job.
                        if outcome is None and job.deadline is not None:
                            outcome = refuse_to_run(job, datetime.now(UTC))
                        if outcome is not None:
                            timer.pause()  # recording is not timed
                            await self._conclude(run, outcome)
                            run = None
                            continue
                        if observer is not None:
                            run.observed = observer.job_started(job)
                        tx = run.tx = LazyTransaction(partial(self._open_transaction, run))
                        run.scope = scope
                        started = True
                        timer.start()
                        exc = await run_handler(self.handler, job, tx)  # type: ignore[arg-type]
                        run.scope = None
                        if timer.fired() or run.lost:
                            break  # the handler caught the cancellation: concluded below
                        if exc is None and tx.conn is None:
                            self._acknowledge_later(run)  # no await: nothing to time
                        else:
                            timer.pause()  # recording is not timed
                            broke = self._broke(tx.conn) if tx.conn is not None else None
                            outcome = decide(job, exc or broke, self.handler.backoff)
                            await self._conclude(run, outcome)
                        run = None
                        # Let other tasks run now and then, as database round
                        # trips would: a no-op handler never yields by itself.
                        streak += 1
                        if streak == _STREAK:
                            streak = 0
                            await anyio.lowlevel.checkpoint()
                if run is not None and not started:
                    # The timer fired as the run was handed over: run it next.
                    ready.appendleft(run)
                    run = None
                elif run is not None:  # cut short by its timeout, or its lease was lost
                    run.scope = None
                    if run.lost:
                        await self._drop_lost(run)
                    else:
                        outcome = decide(run.lease.job, timer.error(), self.handler.backoff)
                        await self._conclude(run, outcome)
                    run = None
        except BaseException:
            if run is not None:
                run.scope = None
                if not run.lost:  # cancelled by shutdown: the lease goes back
                    self._cut_short.append(run.lease)
                    if run.observed is not None and observer is not None:
                        observer.job_abandoned(run.lease.job, run.observed)
                with anyio.CancelScope(shield=True):
                    await self._close(run)
                self._free_slot(run)
            raise

    async def _wait_idle(self, event: anyio.Event) -> None:
        """Wait in the idle line until ``_wake_worker`` (or shutdown) wakes
        this worker; one that leaves unwoken (its timer fired) leaves the line."""
        self._idle.append(event)
        try:
            await event.wait()
        finally:
            if event.is_set():
                self._waking = False
            else:
                self._idle.remove(event)

    async def _conclude(self, run: _Run, outcome: Outcome) -> None:
        """Record and report a run's outcome, and free its slot. A success of a
        job that never opened its transaction is left to the acknowledger."""
        lease = run.lease
        tx = run.tx
        if outcome.kind == "processed" and (tx is None or tx.conn is None):
            self._acknowledge_later(run)
            return
        try:
            outcome, recorded = await self._record(run, outcome)
        finally:
            await self._close(run)
            self._free_slot(run)
        await self._free_slots([lease])
        if recorded and outcome.kind in ("retry", "snooze"):  # due again later
            self._on_retry(lease.id, lease.job.queue, outcome.delay)
        await report(
            outcome,
            lease.job,
            self._recover,
            self._log,
            recorded=recorded,
            observer=self._observer,
            state=run.observed,
        )

    async def _free_slots(self, leases: list[Lease]) -> None:
        """Free the global-concurrency slots of jobs whose lease ended (a
        failure here only keeps them busy until their leases expire)."""
        if self._limits is None or self._limits.slots is None or not leases:
            return
        try:
            await self._leases.free_slots(self.handler.queue, leases)
        except (DatabaseError, PoolTimeoutError) as exc:
            self._log.warning("queue %s: cannot free slots: %s", self.handler.queue, exc)

    def _acknowledge_later(self, run: _Run) -> None:
        """A success without a transaction: written in the next batch, and
        reported then (``_acknowledge``). While claimed jobs still wait for a
        worker, the batch waits for them to start (``_ready_drained``): quick
        jobs then go in one statement, not in many small ones."""
        self._acks.append(run)
        self._free_slot(run)
        if not self._ready or len(self._acks) >= BATCH:
            self._acks_waiting.set()

    def _ready_drained(self) -> None:
        """The last claimed job waiting for a worker got one: write the
        successes held back meanwhile."""
        if self._acks:
            self._acks_waiting.set()

    async def _drop_lost(self, run: _Run) -> None:
        """A run whose lease was lost: nothing to record (the job is someone
        else's now); its transaction, if open, rolls back."""
        try:
            await self._close(run)
        finally:
            self._free_slot(run)
        self._report_lost(run)

    async def _open_transaction(self, run: _Run) -> AnyioConnection:
        """``current_transaction()``'s first use: the job's row locked under its lease."""
        if run.lost:
            raise LeaseLostError(f"job {run.lease.id}'s lease was lost: it may run elsewhere now")
        conn = await self._pool.acquire(worker=True)
        self._pool.lend(conn)  # the handler may change anything on it
        run.locked = True
        try:
            await self._leases.lock(conn, run.lease, self._lease)
        except BaseException:
            run.locked = False
            await self._pool.release(conn)
            raise
        return conn

    async def _close(self, run: _Run) -> None:
        """Give the job's connection back; an open transaction rolls back."""
        tx = run.tx
        if tx is not None and tx.conn is not None:
            conn, tx.conn = tx.conn, None
            await self._pool.release(conn)
        run.locked = False

    async def _record(self, run: _Run, outcome: Outcome) -> tuple[Outcome, bool]:
        """Write a run's outcome; returns it (a success whose commit failed is
        a failure) and whether the lease held for it. A database error is
        logged: the job runs again once its lease expires."""
        lease = run.lease
        tx = run.tx
        try:
            if tx is not None and tx.conn is not None:
                if outcome.kind == "processed":
                    try:
                        return outcome, await self._leases.complete_locked(tx.conn, lease)
                    except DatabaseError as exc:
                        outcome = after_failed_record(lease.job, outcome, exc, self.handler.backoff)
                if self._transaction_open(tx.conn):
                    # Under the row lock: no one takes the job over meanwhile.
                    with contextlib.suppress(DatabaseError):
                        return outcome, await self._leases.record_locked(tx.conn, lease, outcome)
                await self._close(run)  # the transaction is gone
            return outcome, await self._leases.record(lease, outcome)
        except (DatabaseError, PoolTimeoutError) as exc:
            self._log.error(
                "job %s on queue %s: cannot record its outcome (%s); it runs again "
                "once its lease expires",
                lease.id,
                lease.job.queue,
                exc,
                extra={"job_id": lease.id, "queue": lease.job.queue},
            )
            return outcome, False

    @staticmethod
    def _transaction_open(conn: AnyioConnection) -> bool:
        """Whether the job's transaction on ``conn`` is open (aborted or not)."""
        pgconn = conn.pgconn
        return pgconn.status == _OK and pgconn.transaction_status in _OPEN

    def _report_lost(self, run: _Run) -> None:
        job = run.lease.job
        if run.observed is not None and self._observer is not None:
            self._observer.job_abandoned(job, run.observed)
        self._log.warning(
            "job %s on queue %s: its lease was lost; the handler was cancelled and its "
            "outcome not recorded (the job may run elsewhere now)",
            job.id,
            job.queue,
            extra={"job_id": job.id, "queue": job.queue},
        )

    # -- heartbeats, acknowledgements, shutdown ------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self._lease / 3
        pause = interval
        while True:
            await anyio.sleep(pause)
            ok = await self._beat(interval)
            pause = interval if ok else min(interval, _BEAT_RETRY)
            # A lease that may lapse before the next beat could end is
            # taken over elsewhere: stop its handler first.
            horizon = anyio.current_time() + pause + interval
            for run in list(self._runs.values()):
                if not run.locked and not run.lost and run.valid_until <= horizon:
                    self._lose(run)

    async def _beat(self, bound: float) -> bool:
        """Extend the running jobs' leases, within ``bound`` seconds; cancels
        the handlers whose lease is gone. Whether it got through."""
        runs = [run for run in self._runs.values() if not run.locked and not run.lost]
        if not runs:
            return True
        sent = anyio.current_time()
        held: set[str] | None = None
        with anyio.move_on_after(bound):
            try:
                held = await self._leases.extend([run.lease for run in runs], self._lease)
            except (DatabaseError, PoolTimeoutError) as exc:
                self._log.warning(
                    "queue %s: cannot extend the leases of %d running jobs: %s",
                    self.handler.queue,
                    len(runs),
                    exc,
                )
                return False
        if held is None:
            self._log.warning(
                "queue %s: extending the leases of %d running jobs took over %g s",
                self.handler.queue,
                len(runs),
                bound,
            )
            return False
        for run in runs:
            if run.lease.id in held:
                run.valid_until = sent + self._lease
            else:
                self._lose(run)  # taken over elsewhere
        if self._limits is not None and self._limits.slots is not None:
            try:
                await self._leases.extend_slots(
                    self.handler.queue, [run.lease for run in runs], self._lease
                )
            except (DatabaseError, PoolTimeoutError) as exc:  # they expire: fewer run for a while
                self._log.warning("queue %s: cannot extend slots: %s", self.handler.queue, exc)
        return True

    def _lose(self, run: _Run) -> None:
        run.lost = True
        if run.scope is not None:  # its handler runs now
            run.scope.cancel()

    async def _acknowledge(self) -> None:
        while True:
            await self._acks_waiting.wait()
            self._acks_waiting = anyio.Event()
            if self._acks_closing and not self._acks:
                self._acks_written.set()
                return
            try:
                await self._write_acks()
            except (DatabaseError, PoolTimeoutError) as exc:
                self._log.warning(
                    "queue %s: cannot record %d processed jobs, trying again: %s",
                    self.handler.queue,
                    len(self._acks),
                    exc,
                )
                await anyio.sleep(_ERROR_PAUSE)
                self._acks_waiting.set()

    async def _write_acks(self) -> None:
        """Write the successes waiting, in one statement, then report them."""
        while self._acks:
            batch, self._acks = self._acks, []
            try:
                lost = await self._leases.complete([run.lease for run in batch])
            except BaseException:
                self._acks[:0] = batch  # written by the next try, or at shutdown
                raise
            await self._free_slots([run.lease for run in batch])
            # A success is reported only to whoever listens: the observer, or
            # a DEBUG log; the lost ones are always logged.
            listening = self._observer is not None or self._log.logger.isEnabledFor(DEBUG)
            if not listening and not lost:
                continue
            for run in batch:
                job = run.lease.job
                recorded = run.lease not in lost
                if recorded and not listening:
                    continue
                if not recorded:
                    self._log.warning(
                        "job %s on queue %s: processed, but its lease was lost before that "
                        "was recorded: it may run again",
                        job.id,
                        job.queue,
                        extra={"job_id": job.id, "queue": job.queue},
                    )
                await report(
                    decide(job, None),
                    job,
                    None,
                    self._log,
                    recorded=recorded,
                    observer=self._observer,
                    state=run.observed,
                )

    async def _final_writes(self) -> None:
        """At shutdown: write the successes still waiting, give back the leases
        of the jobs cut short. Failing here only delays those jobs: their
        leases expire and they run again."""
        try:
            await self._write_acks()
        except (DatabaseError, PoolTimeoutError) as exc:
            self._log.error(
                "queue %s: cannot record %d processed jobs at shutdown; they run "
                "again once their leases expire: %s",
                self.handler.queue,
                len(self._acks),
                exc,
            )
        cut_short, self._cut_short = self._cut_short, []
        if not cut_short:
            return
        try:
            await self._leases.release(cut_short)
            await self._free_slots(cut_short)
        except (DatabaseError, PoolTimeoutError) as exc:
            self._log.error(
                "queue %s: cannot give back the leases of %d jobs cut short by shutdown; "
                "they run again once their leases expire: %s",
                self.handler.queue,
                len(cut_short),
                exc,
            )
