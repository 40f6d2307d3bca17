"""The backend contract, and what every backend shares: handler checks, cron,
logging and shutdown.

``Backend`` is the abstract base both backends derive from; its docstrings
are the public documentation of every method. A backend is built from the
validated ``Options``, prepared (``_prepare``, before any task runs, so setup
failures raise from ``open_backend``), then started in the task group
``open_backend`` opens. Its background services and workers each run under a
cancel scope of their own, so ``shutdown()`` can stop them while the caller's
block goes on:

1. stop taking jobs (``_stop_intake``);
2. let jobs in flight finish for up to ``shutdown_timeout``
   (``_wait_workers``), shielded so that a block leaving by cancellation
   still gets its grace period;
3. cancel the workers and give them a moment to roll back, then cancel the
   services and release resources (``_close``).

``enqueue`` and ``enqueue_many`` are defined here: they call the backend's
``_enqueue`` and ``_enqueue_many`` within the observer's hooks
(``neoq_anyio._observe``: metrics, tracing), or directly when nothing
observes.

The private methods under "for neoq_anyio.testing" are the small interface
the testing helpers use, so they never reach into a backend's state.
"""

from __future__ import annotations

import contextvars
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._batch import check_batch
from ._cron import CronTicker, WallClock
from ._cron_schedule import parse_cron_spec
from ._exceptions import ConfigurationError, DatabaseError, NeoqError, PoolTimeoutError
from ._log import BackendLog
from ._models import check_queue_name, validate_job

if TYPE_CHECKING:
    import logging
    from collections.abc import Awaitable, Callable, Iterable, Sequence
    from contextlib import AbstractAsyncContextManager
    from datetime import datetime, tzinfo

    import psycopg
    from anyio.abc import TaskGroup, TaskStatus

    from ._models import Handler, Job, JobStatus, QueueStats, RecoverCallback
    from ._observe import Observer
    from ._pg._connection import AnyioConnection
    from ._pg._pool import PoolStatistics

__all__ = ["Backend", "BackendStatistics", "Options", "check_listing"]

_CANCEL_GRACE = 5.0  # seconds cancelled workers get to roll back before the pool closes
_PRUNE_INTERVAL = 60.0  # seconds between retention passes, at most
_STATUSES = frozenset({"new", "running", "failed", "processed", "dead"})
_MAX_LIMIT = 10_000


def check_listing(status: object, limit: object, before_id: object) -> int | None:
    """Check ``list_jobs``' arguments; ``before_id`` as a number.

    Raises:
        ConfigurationError: an unknown status, a limit out of range, or a
            ``before_id`` no job can have.
    """
    if status is not None and status not in _STATUSES:
        raise ConfigurationError(
            f"status must be one of {', '.join(sorted(_STATUSES))}, got {status!r}"
        )
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= _MAX_LIMIT:
        raise ConfigurationError(f"limit must be an int from 1 to {_MAX_LIMIT}, got {limit!r}")
    if before_id is None:
        return None
    if not (isinstance(before_id, str) and before_id.isascii() and before_id.isdigit()):
        raise ConfigurationError(f"before_id must be a job id, got {before_id!r}")
    return int(before_id)


@dataclass(frozen=True, slots=True)
class BackendStatistics:
    """A snapshot of a backend, from ``statistics()``.

    Attributes:
        queues: queues with a handler in this process.
        jobs_in_flight: jobs running now in this process.
        pool: the connection pool's use (``None`` on the in-memory backend):
            ``size`` (connections open), ``idle``, ``in_use``, ``waiting``
            (tasks waiting for a connection), ``max_size``
            (``pool_max_conns``, or what the handlers' concurrency grew it
            to), and the workers' share: ``worker_in_use`` and
            ``worker_max_size``.
        listener_reconnects: times the LISTEN connection was re-established.
    """

    queues: tuple[str, ...]
    jobs_in_flight: int
    pool: PoolStatistics | None
    listener_reconnects: int


@dataclass(frozen=True, slots=True)
class Options:
    """``open_backend``'s options, validated and in seconds."""

    connection_timeout: float
    synchronous_commit: bool
    transaction_timeout: float
    job_check_interval: float
    pending_job_check_interval: float
    future_job_window: float
    shutdown_timeout: float
    recovery_callback: RecoverCallback | None
    logger: logging.Logger
    keep_processed: float | None = None
    keep_dead: float | None = None
    observer: Observer | None = None  # metrics and tracing (neoq_anyio._observe)
    pooler: str | None = None  # "transaction" or "transaction_prepared": behind a pooler
    listen_connection_string: str | None = None  # a direct connection for LISTEN


class Backend(ABC):
    """What ``open_backend`` yields: the PostgreSQL or the in-memory backend.

    Write handlers and application code against this, and switch backends by
    changing the connection string alone. Every method must be called while
    the ``open_backend`` block is open. Get one from ``open_backend``; do
    not build or subclass one yourself.
    """

    def __init__(self, options: Options, *, redact: Callable[[str], str] | None = None) -> None:
        self._options = options
        self._log = BackendLog(options.logger, redact) if redact else BackendLog(options.logger)
        self._tg: TaskGroup | None = None
        self._handlers: dict[str, Handler] = {}
        self._worker_scopes: list[anyio.CancelScope] = []
        self._service_scopes: list[anyio.CancelScope] = []
        self._closing = False
        self._closed = anyio.Event()
        self._cron_clock: WallClock = WallClock()
        self._observer = options.observer

    # -- the public API ----------------------------------------------------------------

    async def enqueue(
        self, job: Job, *, connection: psycopg.AsyncConnection[Any] | None = None
    ) -> str:
        """Add a job to its queue and return its id.

        Args:
            job: the job; its queue must not be empty.
            connection: enqueue inside this connection's open transaction,
                so the job exists only if that transaction commits: one from
                ``connection()`` (any loop) or, on asyncio, any psycopg
                ``AsyncConnection``. PostgreSQL only.

        Returns:
            The job's id, a string.

        On the in-memory backend, ``enqueue`` waits while the queue's handler
        has a ``max_queue_capacity`` and the queue holds that many
        unprocessed jobs (as Go neoq's memory backend does).

        Raises:
            NoQueueError: the job has no queue.
            InvalidJobError: the queue name is blank or longer than 63 bytes
                (UTF-8), the payload is not a JSON object or holds a string
                with NUL (the error names its key path), a timestamp is naive,
                or ``max_retries`` is negative. Nothing was stored.
            DuplicateJobError: an unprocessed job with the same queue,
                fingerprint and status exists; nothing was inserted.
            PoolTimeoutError: no pooled connection was free within
                ``connection_timeout`` (PostgreSQL).
            DatabaseError: PostgreSQL failed.
            NoTransactionError: ``connection`` was given to the in-memory
                backend.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        validate_job(job)
        observer = self._observer
        if observer is None:
            return await self._enqueue(job, connection)
        job, state = observer.enqueue_started(job)
        try:
            job_id = await self._enqueue(job, connection)
        except BaseException as exc:
            observer.enqueue_finished(state, job, None, exc)
            raise
        observer.enqueue_finished(state, job, job_id, None)
        return job_id

    async def enqueue_many(
        self, jobs: Iterable[Job], *, connection: psycopg.AsyncConnection[Any] | None = None
    ) -> list[str | None]:
        """Add many jobs in one round trip; their ids, in the order of ``jobs``.

        Each job is checked as ``enqueue`` checks it, all of them before
        anything is stored. A job that ``enqueue`` would refuse as a
        duplicate, of a stored job or of an earlier job of ``jobs``, is
        skipped: its id is ``None``. Workers are woken for the due jobs as
        by ``enqueue``. An empty ``jobs`` returns ``[]`` at once.

        Args:
            jobs: the jobs (a list, a tuple, any iterable).
            connection: enqueue inside this connection's open transaction,
                as ``enqueue`` does: the jobs exist only if it commits.
                PostgreSQL only.

        Returns:
            One entry per job: its id, or ``None`` for a duplicate.

        On the in-memory backend, jobs for a queue whose handler has a
        ``max_queue_capacity`` are added one at a time, each waiting for
        room as ``enqueue`` does; cancelled in such a wait, the jobs added
        before stay.

        Raises:
            NoQueueError, InvalidJobError: a job is invalid, as for
                ``enqueue`` (the message names its index, ``jobs[3]: ...``),
                or ``jobs`` is not an iterable of jobs. Nothing was stored.
            PoolTimeoutError: no pooled connection was free within
                ``connection_timeout`` (PostgreSQL). Nothing was stored.
            DatabaseError: PostgreSQL failed. Nothing was stored.
            NoTransactionError: ``connection`` was given to the in-memory
                backend.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        batch = check_batch(jobs)
        if not batch:
            await anyio.lowlevel.checkpoint()
            return []
        observer = self._observer
        if observer is None:
            return await self._enqueue_many(batch, connection)
        # Each job gets its own enqueue hooks, as from enqueue (one span and
        # one count each), every pair in a copy of this task's context: the
        # hooks may make a context current (tracing makes the job's span
        # current), and doing that here would nest each job's span in the
        # previous one's. Each job's span is a child of the caller's.
        contexts = [contextvars.copy_context() for _ in batch]
        started = [
            context.run(observer.enqueue_started, job)
            for context, job in zip(contexts, batch, strict=True)
        ]
        batch = [job for job, _ in started]
        try:
            ids = await self._enqueue_many(batch, connection)
        except BaseException as exc:
            for context, (job, state) in zip(contexts, started, strict=True):
                context.run(observer.enqueue_finished, state, job, None, exc)
            raise
        for context, (job, state), job_id in zip(contexts, started, ids, strict=True):
            context.run(observer.enqueue_finished, state, job, job_id, None)
        return ids

    @abstractmethod
    async def start(self, handler: Handler) -> None:
        """Start ``handler.concurrency`` workers for ``handler.queue``.

        Returns once the queue is listened to, so a job enqueued right after
        is never missed. Jobs already due on the queue are picked up.

        Raises:
            ConfigurationError: the queue is empty, blank, longer than 63
                bytes or already has a handler, or the handler's
                ``job_timeout`` exceeds the backend's ``transaction_timeout``
                (the message says which to change).
            NeoqError: the backend is shut down.
        """

    @abstractmethod
    def connection(self) -> AbstractAsyncContextManager[AnyioConnection]:
        """Lend a pooled connection for your own transactions, on any loop.

        Use it as ``async with nq.connection() as conn:``. Statements open a
        transaction; when the block ends, an open transaction is committed,
        or rolled back if the block raised. Pass ``conn`` to ``enqueue`` to
        enqueue atomically with your own writes. Your transactions run with
        the server's ``synchronous_commit``, whatever the backend's option.
        The session comes back reset: settings, temporary tables, LISTENs,
        advisory locks, row factories and adapters you set do not outlive
        the block.

        Raises:
            PoolTimeoutError: no pooled connection was free within
                ``connection_timeout``.
            DatabaseError: a connection could not be opened, or the commit
                failed.
            NoTransactionError: on the in-memory backend, which has no
                database.
            NeoqError: the backend is shut down.
        """

    @abstractmethod
    def statistics(self) -> BackendStatistics:
        """A snapshot of the queues with a handler, the jobs running now and the pool's use."""

    # -- managing jobs -------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        """The job with this id, from the live or the dead jobs; ``None`` if unknown.

        Raises:
            DatabaseError: PostgreSQL failed.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        return await self._get_job(job_id)

    async def list_jobs(
        self,
        *,
        queue: str | None = None,
        status: JobStatus | None = None,
        limit: int = 100,
        before_id: str | None = None,
    ) -> list[Job]:
        """Jobs, newest first, the dead ones included, paged by id.

        Args:
            queue: only this queue's jobs.
            status: only jobs in this status (``"dead"`` for the dead jobs).
            limit: at most this many (1 to 10,000).
            before_id: only jobs older than this one: pass the last id of a
                page to get the next.

        Raises:
            ConfigurationError: an unknown status, or a limit out of range.
            DatabaseError: PostgreSQL failed.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        before = check_listing(status, limit, before_id)
        return await self._list_jobs(queue=queue, status=status, limit=limit, before_id=before)

    async def retry_job(self, job_id: str) -> Job:
        """Run a job again now; it keeps its id. Returns the job as it now is.

        A dead job goes back to its queue, due now, with its ``retries`` and
        ``max_retries`` as they were, so it gets one more run (a failure then
        sends it back to the dead jobs). A failed job waiting for its retry,
        and a job scheduled for later, become due now. A processed job runs
        once more. A job being run now is left as it is.

        Raises:
            NoJobError: no job has this id.
            DuplicateJobError: an unprocessed job with the same queue,
                fingerprint and status exists; nothing changed.
            DatabaseError: PostgreSQL failed.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        return await self._retry_job(job_id)

    async def cancel_job(self, job_id: str) -> bool:
        """Move a job not yet processed to the dead jobs, with the error ``cancelled``.

        Returns ``False``, changing nothing, for an unknown id, a processed or
        dead job, or a job being run now in transaction mode.

        Raises:
            DatabaseError: PostgreSQL failed.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        return await self._cancel_job(job_id)

    async def delete_job(self, job_id: str) -> bool:
        """Delete a job, live or dead; ``False`` for an unknown id or a job
        being run now.

        Raises:
            DatabaseError: PostgreSQL failed.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        return await self._delete_job(job_id)

    async def queue_stats(self) -> list[QueueStats]:
        """Every queue that has jobs (dead ones included) or is paused, by
        name, with its counts.

        Raises:
            DatabaseError: PostgreSQL failed.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        return await self._queue_stats()

    async def pause_queue(self, queue: str) -> None:
        """Stop every process from taking jobs of ``queue`` until ``resume_queue``.

        On PostgreSQL the pause is stored in the database: it outlasts
        restarts, holds for processes started later, and applies whether or
        not a handler for the queue runs anywhere yet. This process takes no
        new job of the queue once the call returns; other processes follow
        at once when they listen for notifications, and within
        ``job_check_interval`` in any case. A claim already under way as the
        pause lands may still take its jobs. Jobs running finish normally;
        ``enqueue`` still adds jobs, which wait. ``neoq_anyio.testing.drain``
        does not wait for a paused queue. Pausing a paused queue changes
        nothing.

        Raises:
            ConfigurationError: the queue name is empty, blank or longer
                than 63 bytes.
            PoolTimeoutError: no pooled connection was free within
                ``connection_timeout`` (PostgreSQL).
            DatabaseError: PostgreSQL failed.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        check_queue_name(queue, ConfigurationError)
        await self._set_paused(queue, paused=True)

    async def resume_queue(self, queue: str) -> None:
        """Let processes take jobs of a paused ``queue`` again.

        Jobs that came due while it was paused are taken at once, here as
        soon as the call returns, in other processes as soon as they learn
        of it (as for ``pause_queue``). Resuming a queue that is not paused
        changes nothing.

        Raises:
            ConfigurationError: the queue name is empty, blank or longer
                than 63 bytes.
            PoolTimeoutError: no pooled connection was free within
                ``connection_timeout`` (PostgreSQL).
            DatabaseError: PostgreSQL failed.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        check_queue_name(queue, ConfigurationError)
        await self._set_paused(queue, paused=False)

    async def start_cron(
        self, spec: str, handler: Handler, *, timezone: tzinfo | None = None
    ) -> Handler:
        """Enqueue a job on the handler's queue at every tick of ``spec``, and start the handler.

        Args:
            spec: a robfig/cron spec: five fields (minute first), six with a
                leading seconds field, ``@yearly`` ... ``@hourly``, or
                ``@every <Go duration>`` (whole seconds, at least one).
            handler: runs the ticks' jobs. With an empty queue name
                (``Handler("", fn)``) the queue is named from the schedule's
                English description, as Go neoq names it (``"* * * * * *"``
                gives ``every_second``).
            timezone: the zone the cron fields are read in (default UTC);
                ``@every`` ignores it.

        Returns:
            The handler as started, with its queue name.

        Each tick's job has the payload ``{"tick": "<ISO 8601 time, UTC>"}``
        and is enqueued once however many processes run the same cron; ticks
        missed while every process was down are not replayed.

        Raises:
            ConfigurationError: the spec is malformed, the queue name derived
                from it is longer than 63 bytes (name the handler's queue
                instead), or the handler is refused as by ``start``; nothing
                is scheduled.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        schedule = parse_cron_spec(spec, tz=timezone)
        if not handler.queue:
            try:
                check_queue_name(schedule.queue_name, ConfigurationError)
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"cron spec {spec!r} names no usable queue ({exc}): give the Handler "
                    "a queue name"
                ) from None
            handler = dataclasses.replace(handler, queue=schedule.queue_name)
        await self.start(handler)
        ticker = CronTicker(
            schedule, handler.queue, self._observed_tick, log=self._log, clock=self._cron_clock
        )
        await self._task_group.start(self._run_service, ticker.run)
        return handler

    async def _observed_tick(self, queue: str, tick: datetime) -> bool:
        """``_enqueue_tick``, counted by the observer when this process's claim won."""
        won = await self._enqueue_tick(queue, tick)
        if won and self._observer is not None:
            self._observer.tick_enqueued(queue)
        return won

    def set_logger(self, logger: logging.Logger) -> None:
        """Send the backend's log records to ``logger`` from now on."""
        self._log.logger = logger

    async def shutdown(self) -> None:
        """Shut down while the ``open_backend`` block goes on, as leaving it would.

        Stops taking jobs, lets jobs in flight finish for up to
        ``shutdown_timeout`` seconds, then cancels them (their transactions
        roll back, so they stay queued) and every background task. Calling
        it again waits for the first call to finish. Afterwards ``enqueue``,
        ``start``, ``start_cron`` and ``connection`` raise ``NeoqError``.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            self._stop_intake()
            timeout = self._options.shutdown_timeout
            running = self.statistics().jobs_in_flight
            if running:
                self._log.info(
                    "shutdown: taking no more jobs; %d jobs in flight have %g s to finish",
                    running,
                    timeout,
                )
            with anyio.move_on_after(timeout, shield=True):
                await self._wait_workers()
            running = self.statistics().jobs_in_flight
            if running:
                self._log.info(
                    "shutdown: cancelled %d jobs still running after shutdown_timeout "
                    "(%g s); they stay queued",
                    running,
                    timeout,
                )
            self._cancel_jobs("shutdown_timeout passed")
            # Cancelled workers roll their jobs back as they leave; wait for
            # that before closing the pool under them.
            with anyio.move_on_after(_CANCEL_GRACE, shield=True):
                await self._wait_workers()
            for scope in self._service_scopes:
                scope.cancel(reason="backend shut down")
            self._close()
        finally:
            self._closed.set()

    def _cancel_jobs(self, reason: str) -> None:
        """Cancel the jobs in flight now (they stay queued); the command
        line's second signal calls this during ``shutdown()``."""
        for scope in self._worker_scopes:
            scope.cancel(reason=reason)

    async def _prune_now(self, age: float | None = None) -> tuple[int, int]:
        """Delete processed and dead jobs older than ``age`` seconds (default:
        ``keep_processed`` and ``keep_dead``); how many of each were deleted."""
        options = self._options
        if age is not None:
            return await self._prune(processed_age=age, dead_age=age)
        return await self._prune(processed_age=options.keep_processed, dead_age=options.keep_dead)

    async def _prune_periodically(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Retention: prune at least every ``min(keep, 60 s)`` (a service)."""
        task_status.started()
        keeps = [k for k in (self._options.keep_processed, self._options.keep_dead) if k]
        interval = min([*keeps, _PRUNE_INTERVAL])
        while True:
            try:
                processed, dead = await self._prune_now()
            except (DatabaseError, PoolTimeoutError) as exc:
                self._log.warning("cannot prune old jobs: %s", exc)
            else:
                if processed or dead:
                    self._log.info("pruned %d processed and %d dead jobs", processed, dead)
            await self._sleep(interval)

    async def _sleep(self, seconds: float) -> None:
        """Sleep on the backend's clock (the in-memory backend's may be moved)."""
        await self._cron_clock.sleep(seconds)

    def _retains(self) -> bool:
        """Whether anything is ever pruned (``keep_*`` not both ``None``)."""
        return self._options.keep_processed is not None or self._options.keep_dead is not None

    # -- what each backend provides ------------------------------------------------------

    @abstractmethod
    async def _get_job(self, job_id: str) -> Job | None: ...

    @abstractmethod
    async def _list_jobs(
        self, *, queue: str | None, status: JobStatus | None, limit: int, before_id: int | None
    ) -> list[Job]: ...

    @abstractmethod
    async def _retry_job(self, job_id: str) -> Job: ...

    @abstractmethod
    async def _cancel_job(self, job_id: str) -> bool: ...

    @abstractmethod
    async def _delete_job(self, job_id: str) -> bool: ...

    @abstractmethod
    async def _queue_stats(self) -> list[QueueStats]: ...

    @abstractmethod
    async def _set_paused(self, queue: str, *, paused: bool) -> None:
        """Pause or resume ``queue`` (a checked name) everywhere; in this
        process before returning."""

    @abstractmethod
    async def _enqueue(self, job: Job, connection: psycopg.AsyncConnection[Any] | None) -> str:
        """``enqueue``, unobserved: validate and store the job."""

    @abstractmethod
    async def _enqueue_many(
        self, jobs: Sequence[Job], connection: psycopg.AsyncConnection[Any] | None
    ) -> list[str | None]:
        """``enqueue_many``, unobserved: store checked jobs (at least one) as
        one batch; their ids in order, ``None`` for each duplicate."""

    async def _prepare(self) -> None:  # noqa: B027 - optional hook
        """Set up what the backend needs before any task runs (a database)."""

    @abstractmethod
    async def _start_services(self) -> None:
        """Start the background services in the task group (``_run_service``)."""

    @abstractmethod
    async def _enqueue_tick(self, queue: str, tick: datetime) -> bool:
        """Claim a cron tick and enqueue its job; whether this claim won."""

    @abstractmethod
    def _stop_intake(self) -> None:
        """Shutdown's first step: workers take no more jobs."""

    @abstractmethod
    async def _wait_workers(self) -> None:
        """Return once every worker has returned."""

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release resources once every task is cancelled."""

    # -- for neoq_anyio.testing ----------------------------------------------------------

    @abstractmethod
    async def _prune(
        self, *, processed_age: float | None, dead_age: float | None
    ) -> tuple[int, int]:
        """Delete processed jobs that ran, and dead jobs that died, longer than
        the ages ago (``None``: keep them); how many of each were deleted."""

    @abstractmethod
    async def _wait_drained(self) -> None:
        """Return once no job is due on a queue with a handler, and none runs."""

    @abstractmethod
    async def _stored_jobs(self, queue: str | None, *, dead: bool) -> list[Job]:
        """Every stored job (or dead job), oldest first; works after shutdown."""

    @abstractmethod
    async def _fast_forward(self, seconds: float) -> None:
        """Make ``seconds`` pass for future jobs and retries."""

    # -- shared machinery ----------------------------------------------------------------

    async def _start(self, task_group: TaskGroup) -> None:
        """Start the background services in ``task_group`` (``open_backend``'s)."""
        self._tg = task_group
        await self._start_services()
        if self._observer is not None:
            await task_group.start(self._run_service, partial(self._observer.run, self))

    @property
    def _task_group(self) -> TaskGroup:
        if self._tg is None:
            raise NeoqError("the backend is not open: use it inside `async with open_backend()`")
        return self._tg

    def _check_open(self) -> None:
        if self._closing:
            raise NeoqError("the backend is shut down")

    def _register(self, handler: Handler) -> None:
        """Check a handler before ``start`` and record it.

        Raises:
            ConfigurationError: an empty, unusable (``check_queue_name``) or
                taken queue, or a job_timeout above transaction_timeout.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        queue = handler.queue
        if not queue:
            raise ConfigurationError("the handler has no queue: give Handler a queue name")
        check_queue_name(queue, ConfigurationError)
        if queue in self._handlers:
            raise ConfigurationError(f"queue {queue!r} already has a handler")
        limit = self._options.transaction_timeout
        timeout = handler.timeout_seconds
        # A lease-mode job holds no transaction unless it asks for one, so its
        # timeout is its own business.
        if (
            handler.execution == "transaction"
            and limit > 0
            and (timeout is None or timeout > limit)
        ):
            shown = "no job_timeout" if timeout is None else f"job_timeout={timeout:g} s"
            raise ConfigurationError(
                f"handler for queue {queue!r} has {shown}, above "
                f"transaction_timeout={limit:g} s: PostgreSQL would end the job's session "
                "mid-job. Raise transaction_timeout in open_backend() (0 removes the bound) "
                "or lower job_timeout."
            )
        self._handlers[queue] = handler

    def _log_started(self, handler: Handler) -> None:
        """The lifecycle line each backend's ``start`` ends with."""
        timeout = handler.timeout_seconds
        self._log.info(
            "queue %s started with concurrency %d (job_timeout %s)",
            handler.queue,
            handler.concurrency,
            "none" if timeout is None else f"{timeout:g} s",
        )

    def _recover_callback(self, handler: Handler) -> RecoverCallback | None:
        """The handler's own recover callback, else the backend-wide one."""
        return handler.recover_callback or self._options.recovery_callback

    def _spawn_workers(self, work: Callable[[], Awaitable[None]], count: int) -> None:
        for _ in range(count):
            self._task_group.start_soon(self._run_worker, work)

    async def _run_worker(self, work: Callable[[], Awaitable[None]]) -> None:
        # Shielded: a cancellation of the caller's block must not reach jobs
        # in flight before their grace period; shutdown(), which always runs
        # as the block ends, cancels this scope once shutdown_timeout passed.
        with anyio.CancelScope(shield=True) as scope:
            self._worker_scopes.append(scope)
            await work()

    async def _run_service(
        self,
        service: Callable[..., Awaitable[Any]],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with anyio.CancelScope() as scope:  # cancelled by shutdown
            self._service_scopes.append(scope)
            await service(task_status=task_status)
