"""The PostgreSQL backend: wires the pool, the store, the listener, the
schedulers and the queues' workers together.

Background services (pool maintenance, the LISTEN listener, the future-job
scheduler, the pending-job poller) and the queues' workers all run in the
task group ``open_backend`` opens; setup that can fail (connect, create the
database, migrate, LISTEN) runs before the caller's block (``_prepare``, then
services started through ``TaskGroup.start``), so failures raise from
``async with``.
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
from ._listener import Listener
from ._scheduler import FutureJobs, PendingJobs
from ._schema import prepare_database
from ._store import JobStore
from ._worker import QueueWorkers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import psycopg

    from neoq_anyio._backend import Options
    from neoq_anyio._models import Handler, Job, JobStatus, QueueStats

    from ._wakeups import Wakeups

__all__ = ["PostgresBackend"]

_IDLE = pq.TransactionStatus.IDLE
_DRAIN_POLL = 0.01  # seconds between looks at the database while draining


class PostgresBackend(Backend):
    """The backend on PostgreSQL. Get one from ``open_backend(connection_string)``;
    its methods are ``Backend``'s.

    Raises:
        ConnectionStringError: the connection string is malformed.
    """

    def __init__(self, connection_string: str, options: Options) -> None:
        settings = parse_connection_string(connection_string)
        super().__init__(options, redact=settings.redact)
        self._settings = settings
        self._session_setup = _sql.session_settings(
            synchronous_commit=options.synchronous_commit,
            transaction_timeout=options.transaction_timeout,
        )
        self._pool = ConnectionPool(
            self._open_session,
            settings.pool,
            connection_timeout=options.connection_timeout,
            log=self._log,
            session_setup=self._session_setup,
            lent=_lent,  # what current_transaction() handed to handlers
        )
        self._store = JobStore(self._pool, settings.conninfo, self._log)
        self._admin = JobAdmin(self._pool, self._log)
        self._workers: dict[str, QueueWorkers] = {}
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
        self._pending = PendingJobs(
            self._store, wakeups, interval=options.pending_job_check_interval, log=self._log
        )

    async def _enqueue(self, job: Job, connection: psycopg.AsyncConnection[Any] | None) -> str:
        # The caller's session may not be in UTC, which Go neoq's trigger
        # needs to announce due jobs: then the INSERT announces them itself.
        notify_due = (
            connection is not None
            and (job.run_after is None or job.run_after <= datetime.now(UTC))
            and not _sql.is_utc(connection.info.parameter_status("TimeZone"))
        )
        job_id = await self._store.enqueue(job, notify_due=notify_due, connection=connection)
        if job.run_after is not None:
            delay = (job.run_after - datetime.now(UTC)).total_seconds()
            if delay > 0:
                self._future.add(job_id, job.queue, delay)
        return job_id

    async def start(self, handler: Handler) -> None:
        self._register(handler)
        self._size_pool(handler)
        workers = QueueWorkers(
            handler,
            store=self._store,
            pool=self._pool,
            recover=self._recover_callback(handler),
            on_retry=self._future.add,
            log=self._log,
            observer=self._observer,
        )
        self._wakeups[handler.queue] = workers.wakeups
        self._workers[handler.queue] = workers
        self._spawn_workers(workers.work, handler.concurrency)
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

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AnyioConnection]:
        self._check_open()
        conn = await self._pool.acquire()
        try:
            self._pool.lend(conn)  # reset on release: the caller may change anything on it
            if not self._options.synchronous_commit:
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
        connection while it runs a job; warn if ``pool_max_conns`` leaves too little."""
        self._pool.add_workers(handler.concurrency)
        if not self._settings.pool.max_conns_given:
            return  # the pool grew to fit
        workers = handler.concurrency + sum(w.handler.concurrency for w in self._workers.values())
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
        await prepare_database(self._settings, self._log)

    async def _start_services(self) -> None:
        # No LISTEN connection until a queue is started: a process that only
        # enqueues (a web application) holds none (see _listen).
        for service in (self._pool.run, self._future.run, self._pending.run):
            await self._task_group.start(self._run_service, service)
        if self._retains():
            await self._task_group.start(self._run_service, self._prune_periodically)

    async def _listen(self, queue: str) -> None:
        """LISTEN to ``queue``, starting the listener with the first queue."""
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
        return await self._store.claim_tick(queue, tick, fingerprint, payload)

    def _stop_intake(self) -> None:
        for wakeups in self._wakeups.values():
            wakeups.stop()

    async def _wait_workers(self) -> None:
        for workers in self._workers.values():
            await workers.wait_stopped()

    def _close(self) -> None:
        self._pool.close()

    async def _wait_drained(self) -> None:
        queues = list(self._wakeups)
        while True:  # polling: the database announces no "queue empty" event
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
        try:
            with map_errors(self._log.redact, "cannot set up a session"):
                await conn.execute(self._session_setup)
        except BaseException:
            conn.pgconn.finish()
            raise
        return conn

    async def _open_listener(self) -> AnyioConnection:
        return await connect(self._settings.conninfo, redact=self._log.redact)

    def _on_notify(self, channel: str, payload: str) -> None:
        wakeups = self._wakeups.get(channel)
        if wakeups is not None and payload != "-1":  # Go neoq announces shutdown with -1
            wakeups.hint()

    def _on_reconnect(self) -> None:
        self._pending.poke()
        self._future.rescan()
