"""What every backend shares: handler checks, cron, logging, and shutdown.

A backend lives inside the task group ``open_backend`` opens. Its
background services and workers each run under a cancel scope of their own,
so ``shutdown()`` can stop them while the caller's block goes on:

1. stop taking jobs (``_stop_intake``);
2. let jobs in flight finish for up to ``shutdown_timeout``
   (``_wait_workers``), shielded so that a block leaving by cancellation
   still gets its grace period;
3. cancel the workers and give them a moment to roll back, then cancel the
   services and release resources (``_close``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ._cron import CronTicker, WallClock
from ._cron_schedule import parse_cron_spec
from ._exceptions import ConfigurationError, NeoqError

if TYPE_CHECKING:
    import logging
    from collections.abc import Awaitable, Callable
    from datetime import datetime, tzinfo

    from anyio.abc import TaskGroup, TaskStatus

    from ._models import Handler, RecoverCallback
    from ._pg._pool import PoolStatistics

__all__ = ["BackendCore", "BackendStatistics", "Options"]

_CANCEL_GRACE = 5.0  # seconds cancelled workers get to roll back before the pool closes


@dataclass(frozen=True, slots=True)
class BackendStatistics:
    """A snapshot of a backend, from ``statistics()``.

    Attributes:
        queues: queues with a handler in this process.
        jobs_in_flight: jobs running now in this process.
        pool: the connection pool's use (``None`` on the in-memory backend):
            ``size`` (connections open), ``idle``, ``in_use``, ``waiting``
            (tasks waiting for a connection) and ``max_size``
            (``pool_max_conns``).
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


class BackendCore:
    """Shared machinery of the PostgreSQL and in-memory backends."""

    def __init__(
        self,
        task_group: TaskGroup,
        *,
        transaction_timeout: float,
        shutdown_timeout: float,
        recovery_callback: RecoverCallback | None,
        logger: logging.Logger,
    ) -> None:
        self._tg = task_group
        self._logger = logger
        self._transaction_timeout = transaction_timeout
        self._shutdown_timeout = shutdown_timeout
        self._recovery_callback = recovery_callback
        self._handlers: dict[str, Handler] = {}
        self._worker_scopes: list[anyio.CancelScope] = []
        self._service_scopes: list[anyio.CancelScope] = []
        self._closing = False
        self._closed = anyio.Event()
        self._cron_clock: WallClock = WallClock()

    # -- public API shared by both backends --------------------------------------

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
        down are not replayed. Each job's payload is ``{"tick": "<ISO time>"}``.

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

    def set_logger(self, logger: logging.Logger) -> None:
        """Send the backend's log records to ``logger`` from now on."""
        self._logger = logger

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
            self._stop_intake()
            with anyio.move_on_after(self._shutdown_timeout, shield=True):
                await self._wait_workers()
            for scope in self._worker_scopes:
                scope.cancel()
            # Cancelled workers roll their jobs back as they leave; wait for
            # that before closing the pool under them.
            with anyio.move_on_after(_CANCEL_GRACE, shield=True):
                await self._wait_workers()
            for scope in self._service_scopes:
                scope.cancel()
            self._close()
        finally:
            self._closed.set()

    # -- hooks for the backends ------------------------------------------------------

    async def start(self, handler: Handler) -> None:
        raise NotImplementedError

    async def _enqueue_tick(self, queue: str, tick: datetime) -> bool:
        raise NotImplementedError

    def _stop_intake(self) -> None:
        raise NotImplementedError

    async def _wait_workers(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        """Release resources once every task is cancelled."""

    # -- shared helpers ------------------------------------------------------------------

    def _get_logger(self) -> logging.Logger:
        return self._logger

    def _check_open(self) -> None:
        if self._closing:
            raise NeoqError("the backend is shut down")

    def _register(self, handler: Handler) -> None:
        """Check a handler before ``start`` and record it.

        Raises:
            ConfigurationError: empty or taken queue, or a job_timeout above
                transaction_timeout.
            NeoqError: the backend is shut down.
        """
        self._check_open()
        queue = handler.queue
        if not queue:
            raise ConfigurationError("the handler has no queue: give Handler a queue name")
        if queue in self._handlers:
            raise ConfigurationError(f"queue {queue!r} already has a handler")
        limit = self._transaction_timeout
        timeout = handler.timeout_seconds
        if limit > 0 and (timeout is None or timeout > limit):
            shown = "no job_timeout" if timeout is None else f"job_timeout={timeout:g} s"
            raise ConfigurationError(
                f"handler for queue {queue!r} has {shown}, above "
                f"transaction_timeout={limit:g} s: PostgreSQL would end the job's session "
                "mid-job. Raise transaction_timeout in open_backend() (0 removes the bound) "
                "or lower job_timeout."
            )
        self._handlers[queue] = handler

    def _spawn_workers(self, work: Callable[[], Awaitable[None]], count: int) -> None:
        for _ in range(count):
            self._tg.start_soon(self._run_worker, work)

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
