"""The PostgreSQL backend.

Background services (pool maintenance, the LISTEN listener, the future-job
scheduler, the pending-job poller) and the queues' workers all run in the
task group ``open_backend`` opens; setup that can fail (connect, create the
database, migrate, LISTEN) runs before the caller's block, through
``TaskGroup.start``, so failures raise from ``async with``.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as e
from psycopg import pq, sql

from neoq_anyio._backend import BackendCore, BackendStatistics, Options
from neoq_anyio._cron import CLAIM_TICK, tick_job_fields
from neoq_anyio._exceptions import DatabaseError, DuplicateJobError
from neoq_anyio._fingerprint import encode_payload
from neoq_anyio._models import Handler, Job, RecoverCallback, validate_job
from neoq_anyio._pg._connection import AnyioConnection, connect
from neoq_anyio._pg._dsn import ConnectionSettings, parse_connection_string
from neoq_anyio._pg._errors import map_errors
from neoq_anyio._pg._pool import ConnectionPool

from . import _sql
from ._listener import Listener
from ._scheduler import FutureJobs, PendingJobs
from ._schema import ensure_schema
from ._wakeups import Wakeups
from ._worker import QueueWorkers

if TYPE_CHECKING:
    import logging
    from collections.abc import AsyncIterator, Awaitable, Callable

    from anyio.abc import TaskGroup

__all__ = ["PostgresBackend", "prepare_postgres"]

_IDLE = pq.TransactionStatus.IDLE


class PostgresBackend(BackendCore):
    """A neoq backend on PostgreSQL. Get one from ``open_backend``.

    All methods must be called while the ``open_backend`` block is open.
    """

    def __init__(
        self,
        settings: ConnectionSettings,
        task_group: TaskGroup,
        *,
        pool: ConnectionPool,
        connect_listener: Callable[[], Awaitable[AnyioConnection]],
        job_check_interval: float,
        pending_job_check_interval: float,
        future_job_window: float,
        transaction_timeout: float,
        shutdown_timeout: float,
        recovery_callback: RecoverCallback | None,
        logger: logging.Logger,
    ) -> None:
        super().__init__(
            task_group,
            transaction_timeout=transaction_timeout,
            shutdown_timeout=shutdown_timeout,
            recovery_callback=recovery_callback,
            logger=logger,
        )
        self._settings = settings
        self._pool = pool
        pool.logger = self._get_logger
        self._queues: dict[str, Wakeups] = {}
        self._workers: dict[str, QueueWorkers] = {}
        redact, log = settings.redact, self._get_logger
        self._listener = Listener(
            connect_listener, self._on_notify, self._on_reconnect, logger=log, redact=redact
        )
        self._future = FutureJobs(
            pool,
            self._queues,
            window=future_job_window,
            interval=job_check_interval,
            logger=log,
            redact=redact,
        )
        self._pending = PendingJobs(
            pool, self._queues, interval=pending_job_check_interval, logger=log, redact=redact
        )

    # -- public API ------------------------------------------------------------

    async def enqueue(
        self, job: Job, *, connection: psycopg.AsyncConnection[Any] | None = None
    ) -> str:
        """Add a job to its queue and return its id.

        Args:
            job: the job; its queue must not be empty.
            connection: enqueue inside this connection's open transaction, so
                the job exists only if that transaction commits. Use one from
                ``nq.connection()`` (any loop) or, on asyncio, any psycopg
                ``AsyncConnection``.

        Raises:
            NoQueueError: the job has no queue.
            InvalidJobError: the payload is not a JSON object, a timestamp is
                naive, or ``max_retries`` is negative.
            DuplicateJobError: an unprocessed job with the same queue,
                fingerprint and status exists.
            PoolTimeoutError: no pooled connection was free in time.
            DatabaseError: PostgreSQL failed.
        """
        self._check_open()
        validate_job(job)
        payload, fingerprint = encode_payload(job.queue, job.payload)
        fingerprint = job.fingerprint or fingerprint
        params: tuple[Any, ...] = (job.queue, fingerprint, payload, job.run_after, job.deadline)
        default_retries = job.max_retries is None
        if not default_retries:
            params += (job.max_retries,)
        with map_errors(self._settings.redact, "cannot enqueue the job"):
            if connection is None:
                query = _sql.insert_job(default_max_retries=default_retries)
                conn = await self._pool.acquire()
                try:
                    row = await (await conn.execute(query, params)).fetchone()
                finally:
                    await self._pool.release(conn)
            else:
                # The caller's session may not be in UTC, which Go neoq's
                # trigger needs to announce due jobs: announce them ourselves.
                due = job.run_after is None or job.run_after <= datetime.now(UTC)
                notify = due and not _sql.is_utc(connection.info.parameter_status("TimeZone"))
                query = _sql.insert_job(default_max_retries=default_retries, notify=notify)
                row = await (await connection.execute(query, params)).fetchone()
        if row is None:
            raise DuplicateJobError(
                f"an unprocessed job with fingerprint {fingerprint} "
                f"is already on queue {job.queue!r}"
            )
        job_id: int = row[0]
        if job.run_after is not None:
            delay = (job.run_after - datetime.now(UTC)).total_seconds()
            if delay > 0:
                self._future.add(job_id, job.queue, delay)
        return str(job_id)

    async def _enqueue_tick(self, queue: str, tick: datetime) -> bool:
        fingerprint, payload = tick_job_fields(queue, tick)
        params = {"queue": queue, "tick": tick, "fingerprint": fingerprint, "payload": payload}
        with map_errors(self._settings.redact, "cannot enqueue a cron tick"):
            async with self._pool.connection() as conn:
                cur = await conn.execute(CLAIM_TICK, params)
                return await cur.fetchone() is not None

    async def start(self, handler: Handler) -> None:
        """Start processing ``handler.queue``; returns once the queue is listened to,
        so a job enqueued right after is never missed.

        Raises:
            ConfigurationError: the queue is empty or already has a handler,
                or ``job_timeout`` exceeds ``transaction_timeout``.
            NeoqError: the backend is shut down.
        """
        self._register(handler)
        queue = handler.queue
        wakeups = Wakeups()
        workers = QueueWorkers(
            handler,
            pool=self._pool,
            wakeups=wakeups,
            recovery_callback=self._recovery_callback,
            on_retry=self._future.add,
            logger=self._get_logger,
            redact=self._settings.redact,
        )
        self._queues[queue] = wakeups
        self._workers[queue] = workers
        self._spawn_workers(workers.work, handler.concurrency)
        await self._listener.listen(queue)
        self._future.rescan()
        self._pending.poke()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AnyioConnection]:
        """Lend a pooled connection for your own transactions, on any loop.

        As with psycopg_pool, a transaction still open when the block ends is
        committed, or rolled back if the block raised. Pass the connection to
        ``enqueue(job, connection=conn)`` to enqueue atomically with your
        own writes.

        Raises:
            PoolTimeoutError: no pooled connection was free in time.
            DatabaseError: a connection could not be opened.
        """
        self._check_open()
        conn = await self._pool.acquire()
        conn._autocommit = False  # psycopg's default: statements open a transaction
        try:
            yield conn
            if conn.pgconn.transaction_status != _IDLE:
                with map_errors(self._settings.redact, "cannot commit"):
                    await conn.commit()
        finally:
            await self._pool.release(conn)

    def statistics(self) -> BackendStatistics:
        """Queues, jobs running now, and the pool's use."""
        return BackendStatistics(
            queues=tuple(self._queues),
            jobs_in_flight=sum(w.in_flight for w in self._workers.values()),
            pool=self._pool.statistics(),
            listener_reconnects=self._listener.reconnects,
        )

    def _stop_intake(self) -> None:
        for wakeups in self._queues.values():
            wakeups.stop()

    async def _wait_workers(self) -> None:
        for workers in self._workers.values():
            await workers.wait_stopped()

    def _close(self) -> None:
        self._pool.close()

    def _on_notify(self, channel: str, payload: str) -> None:
        wakeups = self._queues.get(channel)
        if wakeups is not None and payload != "-1":  # Go neoq announces shutdown with -1
            wakeups.hint()

    def _on_reconnect(self) -> None:
        self._pending.poke()
        self._future.rescan()

    async def _start_services(self) -> None:
        with map_errors(self._settings.redact, "cannot start the backend"):
            for service in (
                self._pool.run,
                self._listener.run,
                self._future.run,
                self._pending.run,
            ):
                await self._tg.start(self._run_service, service)


async def _session_setup(
    conn: AnyioConnection, *, synchronous_commit: bool, transaction_timeout: float
) -> None:
    statements = [
        _sql.SESSION_SETUP,
        f"SET idle_in_transaction_session_timeout = {math.ceil(transaction_timeout * 1000):d}",
    ]
    if not synchronous_commit:
        # Durability of the last few commits traded for speed, as Go neoq does.
        statements.append("SET synchronous_commit = off")
    await conn.execute("; ".join(statements).encode())


async def _prepare_database(settings: ConnectionSettings) -> None:
    """Connect once, creating the database and schema when missing."""
    redact = settings.redact
    try:
        conn = await connect(settings.conninfo)
    except e.OperationalError as first_error:
        if not await _create_database(settings):
            raise DatabaseError(
                redact(f"cannot connect to {settings.describe()}: {first_error}")
            ) from None
        with map_errors(redact, f"cannot connect to {settings.describe()}"):
            conn = await connect(settings.conninfo)
    try:
        with map_errors(redact, "cannot set up neoq's schema"):
            await conn.execute(_sql.SESSION_SETUP)
            await ensure_schema(conn)
    finally:
        await conn.close()


async def _create_database(settings: ConnectionSettings) -> bool:
    """Create the target database if it is missing; False if that is not the problem."""
    dbname = settings.dbname
    if not dbname or dbname == "postgres":
        return False
    try:
        conn = await connect(settings.with_dbname("postgres").conninfo)
    except e.OperationalError:
        return False  # the server itself is unreachable: report the first error
    try:
        cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        if await cur.fetchone() is not None:
            return False
        try:
            await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        except e.DuplicateDatabase:
            pass  # another process created it first
        except psycopg.Error as exc:
            raise DatabaseError(
                settings.redact(f"cannot create database {dbname!r}: {exc}")
            ) from None
        return True
    finally:
        await conn.close()


async def prepare_postgres(
    connection_string: str, options: Options
) -> Callable[[TaskGroup], PostgresBackend]:
    """Parse the connection string and set the database up; returns how to build
    the backend once its task group is open.

    Raises:
        ConnectionStringError: the connection string is malformed.
        DatabaseError: the database cannot be reached, created or migrated.
    """
    settings = parse_connection_string(connection_string)

    async def open_session() -> AnyioConnection:
        conn = await connect(settings.conninfo)
        try:
            await _session_setup(
                conn,
                synchronous_commit=options.synchronous_commit,
                transaction_timeout=options.transaction_timeout,
            )
        except BaseException:
            conn.pgconn.finish()
            raise
        return conn

    async def open_listener() -> AnyioConnection:
        return await connect(settings.conninfo)

    await _prepare_database(settings)
    pool = ConnectionPool(
        open_session,
        settings.pool,
        connection_timeout=options.connection_timeout,
        redact=settings.redact,
    )

    def build(task_group: TaskGroup) -> PostgresBackend:
        return PostgresBackend(
            settings,
            task_group,
            pool=pool,
            connect_listener=open_listener,
            job_check_interval=options.job_check_interval,
            pending_job_check_interval=options.pending_job_check_interval,
            future_job_window=options.future_job_window,
            transaction_timeout=options.transaction_timeout,
            shutdown_timeout=options.shutdown_timeout,
            recovery_callback=options.recovery_callback,
            logger=options.logger,
        )

    return build
