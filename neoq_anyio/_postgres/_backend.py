"""The PostgreSQL backend: wires the pool, the store, the listener, the
schedulers and the queues' workers together.

Background services (pool maintenance, the LISTEN listener, the future-job
scheduler, the pending-job poller, the paused-queue reader) and the queues'
workers all run in the task group ``open_backend`` opens; setup that can
fail (connect, create the database, migrate, LISTEN) runs before the
caller's block (``_prepare``, then services started through
``TaskGroup.start``), so failures raise from ``async with``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from psycopg import pq

from neoq_anyio._backend import Backend, BackendStatistics
from neoq_anyio._context import _lent
from neoq_anyio._cron import tick_job_fields
from neoq_anyio._pg._connection import AnyioConnection, connect
from neoq_anyio._pg._dsn import parse_connection_string
from neoq_anyio._pg._errors import map_errors
from neoq_anyio._pg._pool import RESERVED_CONNS, ConnectionPool

from . import _sql
from ._admin import JobAdmin
from ._enqueue_many import BatchEnqueuer
from ._lazy_transaction import LazyTransaction
from ._lease_worker import LeaseWorkers
from ._leases import LeaseStore, limits_of
from ._listener import Listener
from ._pauses import PausedQueues
from ._scheduler import FutureJobs, PendingJobs
from ._schema import prepare_database
from ._sessions import plan_sessions
from ._store import JobStore
from ._worker import QueueWorkers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    import psycopg

    from neoq_anyio._backend import Options
    from neoq_anyio._models import Handler, Job, JobStatus, QueueStats
    from neoq_anyio._pg._dsn import ConnectionSettings

    from ._wakeups import Wakeups

__all__ = ["PostgresBackend"]

_IDLE = pq.TransactionStatus.IDLE
_DRAIN_POLL = 0.01  # seconds between looks at the database while draining
_LEASE_CONNS = 2  # connections a lease-mode queue's pool share grows by


def _redact_both(settings: ConnectionSettings, listen: ConnectionSettings) -> Callable[[str], str]:
    """Scrub both connection strings' passwords."""
    return lambda text: listen.redact(settings.redact(text))


class PostgresBackend(Backend):
    """The backend on PostgreSQL. Get one from ``open_backend(connection_string)``;
    its methods are ``Backend``'s.

    Raises:
        ConnectionStringError: the connection string is malformed.
    """

    def __init__(self, connection_string: str, options: Options) -> None:
        settings = parse_connection_string(connection_string)
        listen = options.listen_connection_string
        listen_settings = parse_connection_string(listen) if listen is not None else None
        super().__init__(
            options,
            redact=_redact_both(settings, listen_settings) if listen_settings else settings.redact,
        )
        self._settings = settings
        sessions = plan_sessions(
            pooler=options.pooler,
            synchronous_commit=options.synchronous_commit,
            transaction_timeout=options.transaction_timeout,
        )
        self._pooled = sessions.pooled  # behind a transaction pooler
        self._session_setup = sessions.setup
        self._pool = ConnectionPool(
            self._open_session,
            settings.pool,
            connection_timeout=options.connection_timeout,
            log=self._log,
            session_setup=sessions.setup,
            session_reset=sessions.reset,
            prepared_statements=sessions.prepared_statements,
            lent=_lent,  # what current_transaction() handed to handlers
        )
        # LISTEN needs a session of its own: through a transaction pooler it
        # goes to listen_connection_string, or nowhere (then workers poll).
        self._listen_settings = listen_settings or (None if sessions.pooled else settings)
        self._polling = self._listen_settings is None
        per_transaction = sessions.per_transaction
        self._store = JobStore(
            self._pool, settings.conninfo, self._log, per_transaction=per_transaction
        )
        self._leases = LeaseStore(self._pool, self._log, per_transaction=per_transaction)
        self._admin = JobAdmin(self._pool, self._log)
        self._batches = BatchEnqueuer(self._pool, self._log)
        self._workers: dict[str, QueueWorkers | LeaseWorkers] = {}
        # The queues' wake-ups, filled in by start(); the services read them.
        wakeups: dict[str, Wakeups] = {}
        self._wakeups = wakeups
        self._listener = Listener(
            self._open_listener, self._on_notify, self._on_reconnect, log=self._log
        )
        self._listening = False
        self._listener_started = anyio.Lock()
        self._future = FutureJobs(
            self._store,
            wakeups,
            window=options.future_job_window,
            interval=options.job_check_interval,
            log=self._log,
        )
        pending_interval = options.pending_job_check_interval
        if self._polling:  # no notifications: the poller is the wake-up
            pending_interval = min(pending_interval, options.job_check_interval)
        self._pending = PendingJobs(self._store, wakeups, interval=pending_interval, log=self._log)
        self._pauses = PausedQueues(
            self._admin, wakeups, interval=options.job_check_interval, log=self._log
        )
        self._following_pauses = False
        self._pauses_started = anyio.Lock()

    async def _enqueue(self, job: Job, connection: psycopg.AsyncConnection[Any] | None) -> str:
        if isinstance(connection, LazyTransaction):  # a lease-mode job's: open it now
            connection = await connection.connection()
        # The caller's session may not be in UTC, which Go neoq's trigger
        # needs to announce due jobs: then the INSERT announces them itself.
        # Behind a transaction pooler no session's zone is known.
        if self._pooled:
            notify_due = job.run_after is None or job.run_after <= datetime.now(UTC)
        else:
            notify_due = (
                connection is not None
                and (job.run_after is None or job.run_after <= datetime.now(UTC))
                and not _sql.is_utc(connection.info.parameter_status("TimeZone"))
            )
        job_id = await self._store.enqueue(job, notify_due=notify_due, connection=connection)
        if self._polling and notify_due:
            self._hint(job.queue)  # no notification reaches this process
        if job.run_after is not None:
            delay = (job.run_after - datetime.now(UTC)).total_seconds()
            if delay > 0:
                self._future.add(job_id, job.queue, delay)
        return job_id

    async def _enqueue_many(
        self, jobs: Sequence[Job], connection: psycopg.AsyncConnection[Any] | None
    ) -> list[str | None]:
        if isinstance(connection, LazyTransaction):  # a lease-mode job's: open it now
            connection = await connection.connection()
        notify_due = self._pooled or (
            connection is not None and not _sql.is_utc(connection.info.parameter_status("TimeZone"))
        )
        ids = await self._batches.enqueue_many(jobs, notify_due=notify_due, connection=connection)
        now = datetime.now(UTC)
        for job, job_id in zip(jobs, ids, strict=True):
            if job_id is not None and job.run_after is not None:
                delay = (job.run_after - now).total_seconds()
                if delay > 0:
                    self._future.add(job_id, job.queue, delay)
                    continue
            if self._polling and job_id is not None:
                self._hint(job.queue)  # no notification reaches this process
        return ids

    async def start(self, handler: Handler) -> None:
        self._check_open()
        await self._follow_pauses()
        self._register(handler)
        self._size_pool(handler)
        workers: QueueWorkers | LeaseWorkers
        if handler.execution == "lease":
            workers = LeaseWorkers(
                handler,
                leases=self._leases,
                pool=self._pool,
                watermark=self._store.watermark(handler.queue),
                recover=self._recover_callback(handler),
                on_retry=self._future.add,
                broke_transaction=self._store.handler_broke_transaction,
                check_interval=self._options.job_check_interval,
                log=self._log,
                observer=self._observer,
            )
            claimers = 1  # it runs the jobs in tasks of its own
            limits = limits_of(handler)
            if limits is not None:
                await self._leases.ensure_limits(handler.queue, limits)
        else:
            workers = QueueWorkers(
                handler,
                store=self._store,
                pool=self._pool,
                recover=self._recover_callback(handler),
                on_retry=self._future.add,
                log=self._log,
                observer=self._observer,
            )
            claimers = handler.concurrency
        self._wakeups[handler.queue] = workers.wakeups
        self._workers[handler.queue] = workers
        self._pauses.attach(handler.queue)
        self._spawn_workers(workers.work, claimers)
        await self._listen(handler.queue)
        self._future.rescan()
        self._pending.poke()
        self._log_started(handler)

    async def _get_job(self, job_id: str) -> Job | None:
        return await self._admin.get_job(job_id)

    async def _list_jobs(
        self, *, queue: str | None, status: JobStatus | None, limit: int, before_id: int | None
    ) -> list[Job]:
        return await self._admin.list_jobs(
            queue=queue, status=status, limit=limit, before_id=before_id
        )

    async def _retry_job(self, job_id: str) -> Job:
        return await self._admin.retry_job(job_id)

    async def _cancel_job(self, job_id: str) -> bool:
        return await self._admin.cancel_job(job_id)

    async def _delete_job(self, job_id: str) -> bool:
        return await self._admin.delete_job(job_id)

    async def _queue_stats(self) -> list[QueueStats]:
        return await self._admin.queue_stats()

    async def _set_paused(self, queue: str, *, paused: bool) -> None:
        await self._pauses.set(queue, paused=paused)

    async def _follow_pauses(self) -> None:
        """From the first ``start`` on, follow the paused queues: LISTEN to
        their announcements first, so no change falls between that and the
        first read, then read them now and periodically (``_pauses``). A
        process that only enqueues does neither."""
        async with self._pauses_started:
            if self._following_pauses:
                return
            await self._listen(_sql.QUEUES_CHANNEL)
            await self._task_group.start(self._run_service, self._pauses.run)
            self._following_pauses = True

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AnyioConnection]:
        self._check_open()
        conn = await self._pool.acquire()
        try:
            self._pool.lend(conn)  # reset on release: the caller may change anything on it
            if not (self._options.synchronous_commit or self._pooled):
                with map_errors(self._log.redact, "cannot lend a connection"):
                    await conn.execute(_sql.LENT_SESSION)
            conn._autocommit = False  # psycopg's default: statements open a transaction
            yield conn
            if conn.pgconn.transaction_status != _IDLE:
                with map_errors(self._log.redact, "cannot commit"):
                    await conn.commit()
        finally:
            await self._pool.release(conn)

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(
            queues=tuple(self._wakeups),
            jobs_in_flight=sum(w.in_flight for w in self._workers.values()),
            pool=self._pool.statistics(),
            listener_reconnects=self._listener.reconnects,
        )

    def _size_pool(self, handler: Handler) -> None:
        """Make room in the pool for the handler's workers, each holding a
        connection while it runs a job (transaction mode); warn if
        ``pool_max_conns`` leaves too little."""
        if handler.execution == "lease":
            # Claims, heartbeats and acknowledgements hold a connection for a
            # statement each; jobs only while their transaction is open.
            self._pool.add_workers(_LEASE_CONNS)
            return
        self._pool.add_workers(handler.concurrency)
        if not self._settings.pool.max_conns_given:
            return  # the pool grew to fit
        workers = handler.concurrency + sum(
            w.handler.concurrency
            for w in self._workers.values()
            if w.handler.execution == "transaction"
        )
        pool = self._pool.statistics()
        if pool.max_size >= workers + RESERVED_CONNS:
            return
        self._log.warning(
            "pool_max_conns=%d is too small for the handlers started (concurrency %d in all) "
            "plus the %d connections kept for enqueue, connection() and background tasks: "
            "at most %d jobs run at once in this process. Raise pool_max_conns to %d, or "
            "leave it out and the pool grows to fit.",
            pool.max_size,
            workers,
            RESERVED_CONNS,
            pool.worker_max_size,
            workers + RESERVED_CONNS,
        )

    # -- the backend's hooks -------------------------------------------------------------

    async def _prepare(self) -> None:
        await prepare_database(self._settings, self._log, pooled=self._pooled)

    async def _start_services(self) -> None:
        # No LISTEN connection until a queue is started: a process that only
        # enqueues (a web application) holds none (see _listen).
        for service in (self._pool.run, self._future.run, self._pending.run):
            await self._task_group.start(self._run_service, service)
        if self._retains():
            await self._task_group.start(self._run_service, self._prune_periodically)

    async def _listen(self, queue: str) -> None:
        """LISTEN to ``queue``, starting the listener with the first queue;
        nothing when polling (behind a transaction pooler, without
        ``listen_connection_string``)."""
        if self._polling:
            return
        async with self._listener_started:
            if not self._listening:
                await self._task_group.start(self._run_service, self._listener.run)
                self._listening = True
        await self._listener.listen(queue)

    async def _prune(
        self, *, processed_age: float | None, dead_age: float | None
    ) -> tuple[int, int]:
        return await self._admin.prune(processed_age=processed_age, dead_age=dead_age)

    async def _enqueue_tick(self, queue: str, tick: datetime) -> bool:
        fingerprint, payload = tick_job_fields(queue, tick)
        claimed = await self._store.claim_tick(queue, tick, fingerprint, payload)
        if claimed and self._polling:
            self._hint(queue)  # no notification reaches this process
        return claimed

    def _stop_intake(self) -> None:
        for wakeups in self._wakeups.values():
            wakeups.stop()

    async def _wait_workers(self) -> None:
        for workers in self._workers.values():
            await workers.wait_stopped()

    def _close(self) -> None:
        self._pool.close()

    async def _wait_drained(self) -> None:
        while True:  # polling: the database announces no "queue empty" event
            queues = [queue for queue, wakeups in self._wakeups.items() if not wakeups.paused]
            if not (await self._store.count_due(queues) or self.statistics().jobs_in_flight):
                return
            await anyio.sleep(_DRAIN_POLL)

    async def _stored_jobs(self, queue: str | None, *, dead: bool) -> list[Job]:
        return await self._store.stored_jobs(queue, dead=dead)

    async def _fast_forward(self, seconds: float) -> None:
        await self._store.fast_forward(seconds)
        self._future.rescan()
        self._pending.poke()

    # -- sessions and notifications ------------------------------------------------------

    async def _open_session(self) -> AnyioConnection:
        """A pooled session: connected, then set up (``_sql.session_settings``)."""
        conn = await connect(self._settings.conninfo, redact=self._log.redact)
        if not self._session_setup:  # behind a pooler: nothing to set up
            return conn
        try:
            with map_errors(self._log.redact, "cannot set up a session"):
                await conn.execute(self._session_setup)
        except BaseException:
            conn.pgconn.finish()
            raise
        return conn

    async def _open_listener(self) -> AnyioConnection:
        settings = self._listen_settings
        assert settings is not None  # not polling
        return await connect(settings.conninfo, redact=self._log.redact)

    def _hint(self, queue: str) -> None:
        """Wake a worker of ``queue`` in this process, if it runs one, for a
        job just enqueued here: when polling, nothing else tells it soon."""
        wakeups = self._wakeups.get(queue)
        if wakeups is not None:
            wakeups.hint()

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == _sql.QUEUES_CHANNEL:  # a queue was paused or resumed
            self._pauses.refresh()
        wakeups = self._wakeups.get(channel)
        if wakeups is not None and payload != "-1":  # Go neoq announces shutdown with -1
            wakeups.hint()

    def _on_reconnect(self) -> None:
        self._pauses.refresh()  # announcements may have been missed too
        self._pending.poke()
        self._future.rescan()
