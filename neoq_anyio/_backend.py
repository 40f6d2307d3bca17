"""The PostgreSQL backend and ``open_backend``, which owns its one task group.

Everything the backend runs in the background lives in the task group that
``open_backend`` opens around the caller's block: pool maintenance, the
LISTEN listener, the future-job scheduler, the pending-job poller and the
queues' workers. Setup that can fail (connect, create the database, migrate,
LISTEN) runs before the block, through ``TaskGroup.start``, so failures raise
from ``async with``.

Shutdown is a cancel scope, not a monitor: stop waking workers, give jobs in
flight ``shutdown_timeout`` seconds, then cancel the workers (their
transactions roll back, so their jobs stay queued) and every background
task.

Exception groups: a lone exception from the block or from a background task
comes out of ``open_backend`` unwrapped; several at once come out as an
``ExceptionGroup``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import psycopg
from psycopg import errors as e
from psycopg import pq, sql

from . import _sql
from ._cron import CLAIM_TICK, CronTicker, WallClock, tick_job_fields
from ._cron_schedule import parse_cron_spec
from ._dsn import ConnectionSettings, parse_connection_string
from ._durations import to_seconds
from ._exceptions import (
    ConfigurationError,
    ConnectionStringError,
    DatabaseError,
    DuplicateJobError,
    NeoqError,
)
from ._fingerprint import encode_payload
from ._listener import Listener
from ._models import Handler, Job, RecoverCallback, validate_job
from ._pg._connection import AnyioConnection, connect
from ._pg._errors import map_errors
from ._pg._pool import ConnectionPool, PoolStatistics
from ._scheduler import FutureJobs, PendingJobs
from ._schema import ensure_schema
from ._wakeups import Wakeups
from ._worker import QueueWorkers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from datetime import timedelta, tzinfo

    from anyio.abc import TaskGroup, TaskStatus

__all__ = [
    "DEFAULT_CONNECTION_TIMEOUT",
    "BackendStatistics",
    "PostgresBackend",
    "open_backend",
]

DEFAULT_CONNECTION_TIMEOUT = 30.0
"""Seconds to wait for a pooled connection before ``PoolTimeoutError`` (Go neoq's default)."""

DEFAULT_TRANSACTION_TIMEOUT = 30.0
DEFAULT_JOB_CHECK_INTERVAL = 1.0
DEFAULT_PENDING_JOB_CHECK_INTERVAL = 60.0
DEFAULT_FUTURE_JOB_WINDOW = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0

_IDLE = pq.TransactionStatus.IDLE
_Duration: TypeAlias = "float | timedelta"


@dataclass(frozen=True, slots=True)
class BackendStatistics:
    """A snapshot of a backend, from ``statistics()``."""

    queues: tuple[str, ...]
    jobs_in_flight: int
    pool: PoolStatistics
    listener_reconnects: int


class PostgresBackend:
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
        self._settings = settings
        self._tg = task_group
        self._pool = pool
        self._logger = logger
        self._transaction_timeout = transaction_timeout
        self._shutdown_timeout = shutdown_timeout
        self._future_job_window = future_job_window
        self._recovery_callback = recovery_callback
        self._queues: dict[str, Wakeups] = {}
        self._workers: dict[str, QueueWorkers] = {}
        self._worker_scopes: list[anyio.CancelScope] = []
        self._service_scopes: list[anyio.CancelScope] = []
        self._closing = False
        self._closed = anyio.Event()
        self._cron_clock = WallClock()  # tests skew it
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

    async def start_cron(
        self, spec: str, handler: Handler, *, timezone: tzinfo | None = None
    ) -> Handler:
        """Run ``handler`` once per tick of the cron ``spec``; returns the handler
        as started (with its queue name when it was derived from the spec).

        ``spec`` uses Go neoq's (robfig/cron) format: five fields (minute
        first), six with a leading seconds field, ``@yearly`` ... ``@hourly``,
        or ``@every <duration>``; it is evaluated in UTC unless ``timezone``
        is given. With ``Handler("", fn)`` the queue is named from the
        schedule's English description as Go neoq names it (``"* * * * * *"``
        gives ``every_second``). However many processes run the same cron,
        each tick's job is enqueued once; ticks missed while every process was
        down are not replayed.

        Raises:
            ConfigurationError: the spec is malformed (nothing is scheduled),
                or the handler is refused as by ``start``.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        schedule = parse_cron_spec(spec, tz=timezone)
        if not handler.queue:
            handler = dataclasses.replace(handler, queue=schedule.queue_name)
        await self.start(handler)
        ticker = CronTicker(
            schedule,
            handler.queue,
            self._enqueue_tick,
            logger=self._get_logger,
            clock=self._cron_clock,
        )
        await self._tg.start(self._run_service, ticker.run)
        return handler

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
        self._check_open()
        queue = handler.queue
        if not queue:
            raise ConfigurationError("the handler has no queue: give Handler a queue name")
        if queue in self._queues:
            raise ConfigurationError(f"queue {queue!r} already has a handler")
        self._check_timeouts(handler)
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
        for _ in range(handler.concurrency):
            self._tg.start_soon(self._run_worker, workers)
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

    def set_logger(self, logger: logging.Logger) -> None:
        """Send the backend's log records to ``logger`` from now on."""
        self._logger = logger

    def statistics(self) -> BackendStatistics:
        """Queues, jobs running now, and the pool's use."""
        return BackendStatistics(
            queues=tuple(self._queues),
            jobs_in_flight=sum(w.in_flight for w in self._workers.values()),
            pool=self._pool.statistics(),
            listener_reconnects=self._listener.reconnects,
        )

    async def shutdown(self) -> None:
        """Stop taking jobs, let jobs in flight finish for up to ``shutdown_timeout``,
        then cancel them (they stay queued) and every background task.

        Leaving the ``open_backend`` block does this too. Calling it again
        waits for the first call to finish.
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            for wakeups in self._queues.values():
                wakeups.stop()
            with anyio.move_on_after(self._shutdown_timeout, shield=True):
                for workers in self._workers.values():
                    await workers.wait_stopped()
            for scope in (*self._worker_scopes, *self._service_scopes):
                scope.cancel()
            self._pool.close()
        finally:
            self._closed.set()

    # -- internals ---------------------------------------------------------------

    def _get_logger(self) -> logging.Logger:
        return self._logger

    def _check_open(self) -> None:
        if self._closing:
            raise NeoqError("the backend is shut down")

    def _check_timeouts(self, handler: Handler) -> None:
        limit = self._transaction_timeout
        timeout = handler.timeout_seconds
        if limit > 0 and (timeout is None or timeout > limit):
            shown = "no job_timeout" if timeout is None else f"job_timeout={timeout:g} s"
            raise ConfigurationError(
                f"handler for queue {handler.queue!r} has {shown}, above "
                f"transaction_timeout={limit:g} s: PostgreSQL would end the job's session "
                "mid-job. Raise transaction_timeout in open_backend() (0 removes the bound) "
                "or lower job_timeout."
            )

    def _on_notify(self, channel: str, payload: str) -> None:
        wakeups = self._queues.get(channel)
        if wakeups is not None and payload != "-1":  # Go neoq announces shutdown with -1
            wakeups.hint()

    def _on_reconnect(self) -> None:
        self._pending.poke()
        self._future.rescan()

    async def _run_worker(self, workers: QueueWorkers) -> None:
        with anyio.CancelScope() as scope:  # cancelled past shutdown_timeout
            self._worker_scopes.append(scope)
            await workers.work()

    async def _run_service(
        self,
        service: Callable[..., Awaitable[Any]],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with anyio.CancelScope() as scope:  # cancelled by shutdown
            self._service_scopes.append(scope)
            await service(task_status=task_status)

    async def _start_services(self) -> None:
        for service in (self._pool.run, self._listener.run, self._future.run, self._pending.run):
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


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The single exception inside nested one-member groups, if that is all there is."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def open_backend(
    connection_string: str | None = None,
    *,
    connection_timeout: _Duration = DEFAULT_CONNECTION_TIMEOUT,
    synchronous_commit: bool = False,
    transaction_timeout: _Duration = DEFAULT_TRANSACTION_TIMEOUT,
    job_check_interval: _Duration = DEFAULT_JOB_CHECK_INTERVAL,
    pending_job_check_interval: _Duration = DEFAULT_PENDING_JOB_CHECK_INTERVAL,
    future_job_window: _Duration = DEFAULT_FUTURE_JOB_WINDOW,
    shutdown_timeout: _Duration = DEFAULT_SHUTDOWN_TIMEOUT,
    recovery_callback: RecoverCallback | None = None,
    logger: logging.Logger | None = None,
) -> AsyncIterator[PostgresBackend]:
    """Open a backend for the block; leaving the block shuts it down.

    Args:
        connection_string: a ``postgres://`` / ``postgresql://`` URL or a
            libpq ``key=value`` string, with Go neoq's ``pool_*`` options.
        connection_timeout: seconds to wait for a pooled connection (30).
        synchronous_commit: keep PostgreSQL's ``synchronous_commit`` for
            neoq's sessions; off by default, which makes job bookkeeping
            several times faster but can lose the last few commits if the
            server crashes (those jobs then run again).
        transaction_timeout: seconds a job's transaction may sit idle
            (PostgreSQL's ``idle_in_transaction_session_timeout``, 30);
            0 means no bound. A handler's ``job_timeout`` may not exceed it.
        job_check_interval: seconds between looks for future jobs (1).
        pending_job_check_interval: seconds between looks for due jobs no
            notification announced (60).
        future_job_window: how far ahead, in seconds, future jobs are
            scheduled in memory (30).
        shutdown_timeout: seconds jobs in flight get to finish on shutdown
            before they are cancelled (30).
        recovery_callback: default ``callback(job, exc)`` for handler errors.
        logger: where log records go (default: ``logging.getLogger("neoq_anyio")``).

    Raises:
        ConnectionStringError: the connection string is empty or malformed.
        ConfigurationError: an option is out of range.
        DatabaseError: the database cannot be reached or set up.
    """
    if connection_string is None or connection_string == "memory://":
        raise ConfigurationError("the in-memory backend is not available yet")
    if not isinstance(connection_string, str):
        raise ConnectionStringError("the connection string must be a str")
    settings = parse_connection_string(connection_string)
    conn_timeout = to_seconds(connection_timeout, name="connection_timeout", allow_zero=False)
    tx_timeout = to_seconds(transaction_timeout, name="transaction_timeout")
    check_interval = to_seconds(job_check_interval, name="job_check_interval", allow_zero=False)
    pending_interval = to_seconds(
        pending_job_check_interval, name="pending_job_check_interval", allow_zero=False
    )
    window = to_seconds(future_job_window, name="future_job_window")
    stop_timeout = to_seconds(shutdown_timeout, name="shutdown_timeout")
    log = logger or logging.getLogger("neoq_anyio")

    async def open_session() -> AnyioConnection:
        conn = await connect(settings.conninfo)
        try:
            await _session_setup(
                conn, synchronous_commit=synchronous_commit, transaction_timeout=tx_timeout
            )
        except BaseException:
            conn.pgconn.finish()
            raise
        return conn

    async def open_listener() -> AnyioConnection:
        return await connect(settings.conninfo)

    await _prepare_database(settings)
    pool = ConnectionPool(
        open_session, settings.pool, connection_timeout=conn_timeout, redact=settings.redact
    )
    try:
        async with anyio.create_task_group() as tg:
            backend = PostgresBackend(
                settings,
                tg,
                pool=pool,
                connect_listener=open_listener,
                job_check_interval=check_interval,
                pending_job_check_interval=pending_interval,
                future_job_window=window,
                transaction_timeout=tx_timeout,
                shutdown_timeout=stop_timeout,
                recovery_callback=recovery_callback,
                logger=log,
            )
            try:
                with map_errors(settings.redact, "cannot start the backend"):
                    await backend._start_services()
                yield backend
            finally:
                await backend.shutdown()
    except BaseExceptionGroup as group:
        lone = _unwrap(group)
        if lone is None:
            raise
        cause, context = lone.__cause__, lone.__context__
        try:
            raise lone
        finally:
            lone.__cause__, lone.__context__ = cause, context
    finally:
        pool.close()
