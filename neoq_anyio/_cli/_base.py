"""What every command shares: the Click group, common options, running on a loop, errors."""

from __future__ import annotations

import importlib.util
import json
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import click

from neoq_anyio._models import job_document
from neoq_anyio._open import lone_exception

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from neoq_anyio._backend import Backend


__all__ = [
    "Failure",
    "backend_options",
    "cli",
    "dsn_option",
    "echo_json",
    "job_document",
    "json_option",
    "loop_option",
    "require_dsn",
    "run",
    "usage",
    "with_backend",
]

_LOOPS = ("asyncio", "trio")
_POOLERS = ("session", "transaction", "transaction_prepared")
_BACKEND_OPTIONS = "neoq_anyio.backend_options"  # where the pooler options wait in ctx.meta


class Failure(Exception):
    """An action that cannot apply (exit status 1)."""


def usage(message: str) -> NoReturn:
    raise click.UsageError(message)


def dsn_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--dsn``, and what stands between it and PostgreSQL: ``--pooler`` and
    ``--listen-dsn`` (read back with ``backend_options()``)."""
    function = click.option(
        "--listen-dsn",
        envvar="NEOQ_LISTEN_DSN",
        metavar="DSN",
        expose_value=False,
        callback=_keep_backend_option("listen_connection_string"),
        help="A direct connection string for LISTEN, when --dsn leads through a "
        "transaction pooler; default: $NEOQ_LISTEN_DSN, else workers poll.",
    )(function)
    function = click.option(
        "--pooler",
        envvar="NEOQ_POOLER",
        type=click.Choice(_POOLERS),
        expose_value=False,
        callback=_keep_backend_option("pooler"),
        help="The pooler --dsn leads through (transaction: PgBouncer's pool_mode, "
        "see docs/poolers.md); default: $NEOQ_POOLER, else none or session pooling.",
    )(function)
    return click.option(
        "--dsn",
        envvar="NEOQ_DSN",
        metavar="DSN",
        help="PostgreSQL connection string (URL or key=value); default: $NEOQ_DSN.",
    )(function)


def _keep_backend_option(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def keep(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            ctx.meta.setdefault(_BACKEND_OPTIONS, {})[name] = value

    return keep


def backend_options() -> dict[str, Any]:
    """``open_backend``'s ``pooler`` and ``listen_connection_string``, as the
    running command's ``--pooler`` and ``--listen-dsn`` gave them (or their
    environment variables). Call it in the command, before ``run``."""
    return dict(click.get_current_context().meta.get(_BACKEND_OPTIONS, {}))


def loop_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--loop",
        type=click.Choice(_LOOPS),
        default="asyncio",
        show_default=True,
        help="The event loop to run on.",
    )(function)


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print exactly one JSON document, for scripts."
    )(function)


def require_dsn(dsn: str | None) -> str:
    """The DSN, checked before anything starts (a bad one is a usage error)."""
    from neoq_anyio._pg._dsn import parse_connection_string

    if not dsn:
        usage("no database: pass --dsn or set NEOQ_DSN")
    parse_connection_string(dsn)  # raises ConnectionStringError, naming the culprit
    return dsn


def run(function: Callable[[], Awaitable[Any]], loop: str = "asyncio") -> Any:
    """Run ``function`` on the chosen loop through AnyIO."""
    if loop == "trio" and importlib.util.find_spec("trio") is None:
        usage("--loop trio needs trio: pip install 'neoq_anyio[trio]'")
    try:
        return anyio.run(function, backend=loop)
    except BaseExceptionGroup as group:
        lone = lone_exception(group)
        if lone is None:
            raise
        raise lone from None


def with_backend(dsn: str | None, action: Callable[[Backend], Awaitable[Any]]) -> Any:
    """Open the backend at ``dsn`` (with the command's pooler options), run
    ``action(nq)`` on it, and return what it returns."""
    from neoq_anyio._open import open_backend

    checked = require_dsn(dsn)
    options = backend_options()

    async def go() -> Any:
        # No background pruning in a short-lived command (prune runs its own pass).
        async with open_backend(checked, keep_processed=None, keep_dead=None, **options) as nq:
            return await action(nq)

    return run(go)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """neoq_anyio: background jobs on PostgreSQL, for asyncio and trio.

    \b
    Run workers:      neoq-anyio worker myapp.jobs:setup --dsn postgresql://app@db/app
    Set up a schema:  neoq-anyio migrate
    Queue a job:      neoq-anyio enqueue emails '{"to": "ada@example.com"}'

    Every command takes --dsn, or reads NEOQ_DSN. `neoq-anyio COMMAND --help`
    tells more.
    """


def echo_json(document: Any) -> None:
    click.echo(json.dumps(document, ensure_ascii=False))
