"""``neoq-anyio worker``: run an application's handlers until a signal says stop.

Two-signal shutdown, as operators of Celery, River and Oban expect: the first
SIGTERM or SIGINT stops taking jobs and lets jobs in flight finish for up to
``shutdown_timeout`` (exit status 0); a second one cancels them at once, so
their transactions roll back and they stay queued (exit status 1). Signals
are read through AnyIO's signal receiver, on asyncio and trio alike; one
that arrives while the backend starts interrupts the start.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import anyio

from neoq_anyio._open import open_backend

from ._signals import watch_signals

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from neoq_anyio._backend import Backend

__all__ = ["TargetError", "load_target", "run_worker"]

log = logging.getLogger("neoq_anyio.worker")


class TargetError(Exception):
    """``MODULE:FUNCTION`` does not name an async function that can be imported."""


def load_target(spec: str) -> Callable[[Backend], Awaitable[Any]]:
    """Import ``MODULE:FUNCTION`` with the current directory on ``sys.path``.

    Raises:
        TargetError: a malformed spec, a module that fails to import, a
            missing attribute, or one that is not an async function.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"expected MODULE:FUNCTION, got {spec!r}")
    # As uvicorn and celery do: the application usually sits in the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the application's own import errors, summarised
        raise TargetError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise TargetError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target) or not (
        inspect.iscoroutinefunction(target)
        or inspect.iscoroutinefunction(getattr(target, "__call__", None))  # noqa: B004
    ):
        raise TargetError(f"{spec} is not an async function: expected `async def {attr}(nq)`")
    return target  # type: ignore[no-any-return]


async def run_worker(
    target: Callable[[Backend], Awaitable[Any]],
    dsn: str,
    *,
    shutdown_timeout: float,
    metrics_address: tuple[str, int] | None = None,
    backend_options: Mapping[str, Any] | None = None,
) -> int:
    """Open the backend, await ``target(nq)``, serve until a signal; the exit status.

    ``metrics_address``: serve Prometheus metrics at ``http://HOST:PORT/metrics``
    from the worker's task group, so the endpoint stops with the worker.
    ``backend_options``: more ``open_backend`` options (``pooler``,
    ``listen_connection_string``).
    """
    stop = anyio.Event()
    forced = False
    backend: Backend | None = None

    def first(name: str) -> None:
        nonlocal forced
        stop.set()
        if backend is None:
            log.warning("%s during startup: stopping", name)
            forced = True
            startup.cancel(reason=name)
        else:
            log.info(
                "%s: taking no more jobs; jobs in flight have %g s to finish "
                "(send it again to cancel them now)",
                name,
                shutdown_timeout,
            )

    def again(name: str) -> None:
        nonlocal forced
        forced = True
        log.warning("%s again: cancelling jobs in flight; they stay queued", name)
        if backend is not None:
            backend._cancel_jobs(f"{name} received twice")

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as startup:
            await tg.start(watch_signals, first, again)
            metrics = metrics_address is not None
            async with open_backend(
                dsn, shutdown_timeout=shutdown_timeout, metrics=metrics, **(backend_options or {})
            ) as nq:
                await target(nq)
                if metrics_address is not None:
                    from neoq_anyio._metrics import load_prometheus, serve_metrics

                    host, port = metrics_address
                    registry = load_prometheus().REGISTRY
                    port = await tg.start(serve_metrics, registry, host, port)
                    log.info("serving metrics on http://%s:%d/metrics", host, port)
                backend = nq
                log.info("worker started: queues %s", ", ".join(nq.statistics().queues) or "none")
                await stop.wait()
            log.info("worker stopped")
        tg.cancel_scope.cancel()
    return 1 if forced else 0
