"""``open_backend``: pick the backend from the connection string and own its task group.

Exception groups: a lone exception from the caller's block or from a
background task comes out of ``open_backend`` unwrapped; several at once come
out as an ``ExceptionGroup``.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

import anyio

from ._backend import Options
from ._durations import to_seconds
from ._exceptions import ConfigurationError, ConnectionStringError
from ._memory import MemoryBackend
from ._observe import Observer, combine
from ._postgres._backend import PostgresBackend
from ._postgres._sessions import POOLERS
from ._postgres._sql import idle_timeout_ms

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from datetime import timedelta

    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from ._backend import Backend
    from ._models import RecoverCallback

__all__ = [
    "DEFAULT_CONNECTION_TIMEOUT",
    "POOLER_VALUES",
    "Pooler",
    "lone_exception",
    "open_backend",
]

Pooler: TypeAlias = Literal["session", "transaction", "transaction_prepared"]
"""What ``open_backend(pooler=...)`` takes (``None`` too: no pooler)."""

POOLER_VALUES: Final = (None, "session", *POOLERS)
"""Every value ``open_backend`` accepts for ``pooler``."""

DEFAULT_KEEP_PROCESSED = 86_400.0  # one day
DEFAULT_KEEP_DEAD = 30 * 86_400.0  # thirty days

DEFAULT_CONNECTION_TIMEOUT = 30.0
"""Seconds to wait for a pooled connection before ``PoolTimeoutError`` (Go neoq's default)."""

_MEMORY = "memory://"
# idle_in_transaction_session_timeout is an int of milliseconds.
_MAX_IDLE_TIMEOUT_MS = 2**31 - 1


def _observer(metrics: object, tracing: object) -> Observer | None:
    """What observes the backend: metrics, then tracing; ``None`` for neither.

    Raises:
        ConfigurationError: an extra is missing, or a value of the wrong type.
    """
    observers: list[Observer] = []
    if metrics is not False:
        from ._metrics import MetricsObserver  # imports prometheus_client: only when asked

        observers.append(MetricsObserver(None if metrics is True else metrics))  # type: ignore[arg-type]
    if tracing is not False:
        from ._tracing import TracingObserver  # imports opentelemetry: only when asked

        observers.append(TracingObserver(None if tracing is True else tracing))  # type: ignore[arg-type]
    return combine(observers)


def _checked_pooler(pooler: object) -> str | None:
    """``pooler`` as the backend reads it: ``None`` for a session of our own.

    Raises:
        ConfigurationError: it is none of ``POOLER_VALUES``.
    """
    if pooler is None or pooler == "session":
        return None
    if pooler in POOLERS:
        return str(pooler)
    allowed = ", ".join(repr(value) for value in POOLER_VALUES)
    raise ConfigurationError(f"pooler must be one of {allowed}, got {pooler!r}")


def lone_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The single exception inside nested one-member groups, if that is all there is."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def open_backend(
    connection_string: str = _MEMORY,
    *,
    connection_timeout: float | timedelta = DEFAULT_CONNECTION_TIMEOUT,
    synchronous_commit: bool = False,
    transaction_timeout: float | timedelta = 30.0,
    job_check_interval: float | timedelta = 1.0,
    pending_job_check_interval: float | timedelta = 60.0,
    future_job_window: float | timedelta = 30.0,
    shutdown_timeout: float | timedelta = 30.0,
    recovery_callback: RecoverCallback | None = None,
    logger: logging.Logger | None = None,
    keep_processed: float | timedelta | None = DEFAULT_KEEP_PROCESSED,
    keep_dead: float | timedelta | None = DEFAULT_KEEP_DEAD,
    metrics: bool | CollectorRegistry = False,
    tracing: bool | TracerProvider = False,
    pooler: Pooler | None = None,
    listen_connection_string: str | None = None,
) -> AsyncIterator[Backend]:
    """Open a backend for the block; leaving the block shuts it down.

    Args:
        connection_string: a ``postgres://`` / ``postgresql://`` URL or a
            libpq ``key=value`` string, with Go neoq's ``pool_*`` options; or
            ``"memory://"`` (the default, when it is left out) for the
            in-memory backend. ``None``, typically an unset environment
            variable, is refused rather than taken to mean memory, so a
            missing setting never silently keeps jobs in memory.
        connection_timeout: seconds ``enqueue`` and ``connection()`` wait for
            a pooled connection before ``PoolTimeoutError`` (30; above 0).
        synchronous_commit: keep PostgreSQL's ``synchronous_commit`` for
            neoq's sessions; off by default, which makes job bookkeeping
            several times faster but can lose the last few commits if the
            server crashes: a job marked done runs again, and a job enqueued
            through the backend's pool in that moment is lost.
        transaction_timeout: seconds a job's transaction may sit idle
            (PostgreSQL's ``idle_in_transaction_session_timeout``, 30);
            0 means no bound. PostgreSQL takes at most about 24.8 days
            there, margin included, so about 22 days is the most it may be.
            A handler's ``job_timeout`` may not exceed it.
        job_check_interval: seconds between looks for future jobs (1; above 0).
        pending_job_check_interval: seconds between looks for due jobs no
            notification announced (60; above 0).
        future_job_window: how far ahead, in seconds, future jobs are
            scheduled in memory (30).
        shutdown_timeout: seconds jobs in flight get to finish on shutdown
            before they are cancelled (30).
        recovery_callback: default ``callback(job, exc)`` for handler errors.
        logger: where log records go (default: ``logging.getLogger("neoq_anyio")``).
        keep_processed: how long processed jobs are kept, from when they ran
            (1 day); ``None`` keeps them for ever.
        keep_dead: how long dead jobs are kept, from when they died (30
            days); ``None`` keeps them for ever. One process at a time
            deletes older ones, in small batches, at least every
            ``min(keep, 60 s)``.
        metrics: Prometheus metrics (extra ``neoq_anyio[prometheus]``):
            ``True`` registers them on ``prometheus_client``'s default
            registry, a ``CollectorRegistry`` on that one. See
            docs/observability.md for the names.
        tracing: OpenTelemetry spans (extra ``neoq_anyio[otel]``): ``True``
            takes tracers from the global tracer provider, a
            ``TracerProvider`` from that one. A span per enqueue and per job
            run; the job carries the enqueuer's trace context, so its span
            continues that trace.
        pooler: what stands between the backend and PostgreSQL. ``None``
            (the default) or ``"session"``: a direct connection, or a pooler
            that gives each client a server session of its own (PgBouncer's
            session pooling). ``"transaction"``: a transaction pooler
            (PgBouncer's ``pool_mode = transaction``, most managed poolers),
            which may run each transaction in another server session; then
            nothing relies on session state (settings travel with each
            transaction, due jobs are announced by the statements that
            enqueue them) and psycopg prepares no statement on the server.
            ``"transaction_prepared"``: the same, for a pooler that keeps
            prepared statements per client (PgBouncer 1.22 or later with
            ``max_prepared_statements`` above 0): statements are prepared as
            on a direct connection. See docs/poolers.md.
        listen_connection_string: where LISTEN goes: a connection string
            straight to PostgreSQL (or through session pooling), used for
            one connection and nothing else. Behind a transaction pooler,
            which cannot carry LISTEN, leaving it out makes workers poll for
            due jobs every ``job_check_interval`` instead of being woken;
            otherwise it defaults to ``connection_string``.

    Durations are seconds (``float``) or ``datetime.timedelta``. The
    in-memory backend accepts the same options and ignores those about
    connections and PostgreSQL.

    Yields:
        The backend (``PostgresBackend`` or ``MemoryBackend``), with its
        background tasks running.

    Leaving the block, normally, by an exception or by cancellation, lets
    jobs in flight finish for up to ``shutdown_timeout``, then cancels them;
    the jobs cut short stay queued. A lone
    exception from the block or a background task comes out unwrapped;
    several come out as an ``ExceptionGroup``.

    Raises:
        ConnectionStringError: the connection string (or
            ``listen_connection_string``) is ``None``, empty, malformed or of
            an unknown scheme.
        ConfigurationError: an option is out of range, ``pooler`` is none of
            the values above, or metrics or tracing were asked for without
            their extra installed (the message says what to install).
        DatabaseError: the database cannot be reached or set up.
    """
    if connection_string is None:
        raise ConnectionStringError(
            "the connection string is None (an unset environment variable?): pass a "
            f"PostgreSQL connection string, or {_MEMORY!r} for the in-memory backend"
        )
    if not isinstance(connection_string, str):
        raise ConnectionStringError(
            f"the connection string must be a str, got {type(connection_string).__name__}"
        )
    transaction_pooler = _checked_pooler(pooler)
    if listen_connection_string is not None and not isinstance(listen_connection_string, str):
        raise ConnectionStringError(
            f"listen_connection_string must be a str, got {type(listen_connection_string).__name__}"
        )
    transaction_seconds = to_seconds(transaction_timeout, name="transaction_timeout")
    # Refused on both backends alike, though only PostgreSQL sessions use it.
    idle_ms = idle_timeout_ms(transaction_seconds)
    if idle_ms > _MAX_IDLE_TIMEOUT_MS:
        raise ConfigurationError(
            f"transaction_timeout={transaction_seconds:g} s is too long: it makes "
            f"PostgreSQL's idle_in_transaction_session_timeout {idle_ms} ms, above its "
            f"limit of {_MAX_IDLE_TIMEOUT_MS} ms (about 24.8 days); 0 means no bound"
        )
    options = Options(
        connection_timeout=to_seconds(
            connection_timeout, name="connection_timeout", allow_zero=False
        ),
        synchronous_commit=bool(synchronous_commit),
        transaction_timeout=transaction_seconds,
        job_check_interval=to_seconds(
            job_check_interval, name="job_check_interval", allow_zero=False
        ),
        pending_job_check_interval=to_seconds(
            pending_job_check_interval, name="pending_job_check_interval", allow_zero=False
        ),
        future_job_window=to_seconds(future_job_window, name="future_job_window"),
        shutdown_timeout=to_seconds(shutdown_timeout, name="shutdown_timeout"),
        recovery_callback=recovery_callback,
        logger=logger or logging.getLogger("neoq_anyio"),
        keep_processed=None
        if keep_processed is None
        else to_seconds(keep_processed, name="keep_processed"),
        keep_dead=None if keep_dead is None else to_seconds(keep_dead, name="keep_dead"),
        observer=_observer(metrics, tracing),
        pooler=transaction_pooler,
        listen_connection_string=listen_connection_string,
    )
    backend: Backend
    if connection_string.strip() == _MEMORY:
        backend = MemoryBackend(options)
    else:
        backend = PostgresBackend(connection_string, options)
    await backend._prepare()
    try:
        async with anyio.create_task_group() as tg:
            try:
                await backend._start(tg)
                yield backend
            finally:
                await backend.shutdown()
    except BaseExceptionGroup as group:
        lone = lone_exception(group)
        if lone is None:
            raise
        cause, context = lone.__cause__, lone.__context__
        try:
            raise lone
        finally:
            lone.__cause__, lone.__context__ = cause, context
