"""``neoq-anyio dashboard``: the web dashboard, served by Hypercorn on asyncio or trio.

The address is tried and the backend opened first, so a port in use, a bad
DSN or an unreachable database fails in one line before anything listens;
then Hypercorn serves ``create_app(nq)`` on the same loop until SIGTERM or
SIGINT, which stops it gracefully (exit status 0). A second signal cancels
what is left at once (exit status 1).
Hypercorn's own messages ("Running on http://HOST:PORT") go to the
``neoq_anyio.dashboard`` logger; it keeps no access log, which would record
a ``?token=`` in its URLs.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import anyio
import click

from ._base import (
    Failure,
    backend_options,
    cli,
    dsn_option,
    loop_option,
    require_dsn,
    run,
    usage,
)
from ._signals import watch_signals

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from hypercorn.config import Config

__all__ = ["dashboard", "serve_dashboard"]

log = logging.getLogger("neoq_anyio.dashboard")

_TOKEN_VARIABLE = "NEOQ_DASHBOARD_TOKEN"
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_GRACE = 5.0  # seconds requests in flight get to finish after the first signal


@cli.command()
@dsn_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 or :: for every interface.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to listen on; 0 picks a free one (the log says which).",
)
@loop_option
@click.option("--read-only", is_flag=True, help="Show no retry, cancel or delete; refuse them.")
@click.option(
    "--token",
    envvar=_TOKEN_VARIABLE,
    metavar="TOKEN",
    help="Require this token (Authorization: Bearer TOKEN, or a browser login); "
    f"default: ${_TOKEN_VARIABLE}, which other users cannot read from the process list.",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="Also answer requests for this host name (a reverse proxy that keeps the Host "
    "header). On a loopback address without a token, only loopback names are answered.",
)
def dashboard(
    dsn: str | None,
    host: str,
    port: int,
    loop: str,
    read_only: bool,
    token: str | None,
    allowed_hosts: tuple[str, ...],
) -> None:
    """Serve the web dashboard: queues, jobs, and retry, cancel and delete buttons.

    \b
    It listens on 127.0.0.1 unless told otherwise. Anywhere else, give it a
    token, and put it behind a reverse proxy that terminates TLS.
    Browsers log in with the token once (a login form, or ?token=TOKEN);
    scripts and Prometheus send Authorization: Bearer TOKEN.
    """
    if (
        importlib.util.find_spec("starlette") is None
        or importlib.util.find_spec("hypercorn") is None
    ):
        usage("the dashboard needs the web extra: pip install 'neoq_anyio[web]'")
    if token is None and os.environ.get(_TOKEN_VARIABLE) == "":
        usage(f"{_TOKEN_VARIABLE} is set but empty: set a token, or unset it")
    if token == "":
        usage("--token is empty: give a token, or leave the option out")
    dsn = require_dsn(dsn)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not _is_loopback(host) and token is None:
        log.warning(
            "listening on %s without a token: anyone who can reach this port can see the jobs%s",
            host,
            "" if read_only else " and retry, cancel or delete them",
        )
    options = backend_options()
    status = run(
        lambda: serve_dashboard(
            dsn,
            backend_options=options,
            host=host,
            port=port,
            loop=loop,
            read_only=read_only,
            token=token,
            allowed_hosts=_allowed_hosts(host, token, allowed_hosts),
        ),
        loop,
    )
    sys.exit(status)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _allowed_hosts(host: str, token: str | None, given: tuple[str, ...]) -> list[str] | None:
    """The Host names to answer; ``None`` for any.

    On a loopback address without a token, loopback names only: a web page the
    operator visits cannot then reach the dashboard by DNS rebinding. With a
    token, a page cannot get the session cookie, so any name is fine.
    """
    names = list(given)
    if _is_loopback(host) and (names or token is None):
        names.extend(_LOOPBACK_NAMES)
    return names or None


def _bind(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_dashboard(
    dsn: str,
    *,
    host: str,
    port: int,
    loop: str,
    read_only: bool,
    token: str | None,
    allowed_hosts: list[str] | None,
    backend_options: Mapping[str, Any] | None = None,
) -> int:
    """Open the backend and serve the dashboard until a signal; the exit status.

    ``backend_options``: more ``open_backend`` options (``pooler``,
    ``listen_connection_string``)."""
    from hypercorn.config import Config

    from neoq_anyio._open import open_backend
    from neoq_anyio.web import create_app

    config = Config()
    config.bind = [_bind(host, port)]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = _GRACE
    _check_address(config)
    stop = anyio.Event()
    serving = False  # a signal before this interrupts the start at once
    forced = False

    def first(name: str) -> None:
        log.info("%s: stopping the dashboard", name)
        stop.set()
        if not serving:
            scope.cancel(reason=f"{name} during startup")

    def again(name: str) -> None:
        nonlocal forced
        log.warning("%s again: stopping now", name)
        forced = True
        scope.cancel(reason=f"{name} received twice")

    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as scope:
            await tg.start(watch_signals, first, again)
            # With prometheus_client, /metrics shows the database's queue
            # counts and this process's pool, as a worker's would.
            metrics = importlib.util.find_spec("prometheus_client") is not None
            async with open_backend(dsn, metrics=metrics, **(backend_options or {})) as nq:
                # Starlette's ASGI types and Hypercorn's differ in name only.
                app: Any = create_app(
                    nq, read_only=read_only, token=token, allowed_hosts=allowed_hosts
                )
                serving = True
                # In a task of its own: on Python 3.11, the asyncio.TaskGroup inside
                # hypercorn.asyncio leaves the task that awaited it with a pending
                # cancellation when the shutdown trigger fires, which would break
                # this function's own cancel scopes.
                async with anyio.create_task_group() as server:
                    server.start_soon(_serve, app, config, stop.wait, loop)
        log.info("dashboard stopped")
        tg.cancel_scope.cancel()
    return 1 if forced else 0


async def _serve(
    app: Any, config: Config, shutdown_trigger: Callable[[], Awaitable[None]], loop: str
) -> None:
    if loop == "trio":
        from hypercorn.trio import serve as serve_trio

        await serve_trio(app, config, shutdown_trigger=shutdown_trigger)
    else:
        from hypercorn.asyncio import serve as serve_asyncio

        await serve_asyncio(app, config, shutdown_trigger=shutdown_trigger)


def _check_address(config: Config) -> None:
    """Bind the address once and let it go, so a port in use or an unknown host
    name fails before the database is opened, as one line.

    Raises:
        Failure: the address cannot be listened on.
    """
    try:
        sockets = config.create_sockets()
    except OSError as exc:
        raise Failure(f"cannot listen on {config.bind[0]}: {exc.strerror or exc}") from None
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets, *sockets.quic_sockets):
        sock.close()
