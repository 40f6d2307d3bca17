"""``worker``, ``migrate`` and ``enqueue``."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from datetime import UTC, datetime, timedelta

import click

from ._base import (
    backend_options,
    cli,
    dsn_option,
    json_option,
    loop_option,
    require_dsn,
    run,
    usage,
)


@cli.command()
@click.argument("target", metavar="MODULE:FUNCTION")
@dsn_option
@loop_option
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long jobs in flight may finish after the first signal.",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Log level of the records printed on stderr.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    metavar="PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (needs neoq_anyio[prometheus]).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="The address --metrics-port binds to (0.0.0.0: every interface).",
)
def worker(
    target: str,
    dsn: str | None,
    loop: str,
    shutdown_timeout: float,
    log_level: str,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run the handlers that MODULE:FUNCTION starts, until SIGTERM or SIGINT.

    FUNCTION is `async def FUNCTION(nq)`: it starts handlers and crons on the
    backend `nq` (nq.start(...), nq.start_cron(...)) and returns. The module
    is imported with the current directory on sys.path.

    \b
    The first SIGTERM or SIGINT stops taking jobs and lets jobs in flight
    finish for up to --shutdown-timeout seconds: exit status 0. A second one
    cancels them at once (they stay queued and run again later): exit
    status 1.
    """
    from ._worker import TargetError, load_target, run_worker

    dsn = require_dsn(dsn)
    try:
        function = load_target(target)
    except TargetError as exc:
        usage(str(exc))
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    address = None
    if metrics_port is not None:
        if importlib.util.find_spec("prometheus_client") is None:
            usage("--metrics-port needs prometheus_client: pip install 'neoq_anyio[prometheus]'")
        address = (metrics_host, metrics_port)
    options = backend_options()
    status = run(
        lambda: run_worker(
            function,
            dsn,
            shutdown_timeout=shutdown_timeout,
            metrics_address=address,
            backend_options=options,
        ),
        loop,
    )
    sys.exit(status)


@cli.command()
@dsn_option
def migrate(dsn: str | None) -> None:
    """Create or upgrade neoq's tables, then exit.

    For deployments whose application role has no DDL rights: run this once
    as the schema's owner; the application then starts without DDL.
    """
    from neoq_anyio._log import BackendLog
    from neoq_anyio._pg._dsn import parse_connection_string
    from neoq_anyio._postgres._schema import prepare_database
    from neoq_anyio._postgres._sessions import POOLERS

    settings = parse_connection_string(require_dsn(dsn))
    log = BackendLog(logging.getLogger("neoq_anyio"), settings.redact)
    pooled = backend_options().get("pooler") in POOLERS
    run(lambda: prepare_database(settings, log, pooled=pooled))
    click.echo("schema is up to date")


@cli.command()
@click.argument("queue")
@click.argument("payload", metavar="JSON", default="{}")
@dsn_option
@click.option(
    "--delay", type=click.FloatRange(min=0), metavar="SECONDS", help="Run it this much later."
)
@click.option("--max-retries", type=click.IntRange(min=0), help="Retries before it dies.")
@click.option("--fingerprint", help="Deduplication key (default: md5 of queue and payload).")
@json_option
def enqueue(
    queue: str,
    payload: str,
    dsn: str | None,
    delay: float | None,
    max_retries: int | None,
    fingerprint: str | None,
    as_json: bool,
) -> None:
    """Add a job with a JSON object PAYLOAD to QUEUE; prints its id."""
    from neoq_anyio._models import Job
    from neoq_anyio._open import open_backend

    dsn = require_dsn(dsn)
    options = backend_options()
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        usage(f"JSON is not valid JSON: {exc}")
    run_after = datetime.now(UTC) + timedelta(seconds=delay) if delay else None
    job = Job(queue, data, fingerprint=fingerprint, run_after=run_after, max_retries=max_retries)

    async def go() -> str:
        async with open_backend(dsn, keep_processed=None, keep_dead=None, **options) as nq:
            return await nq.enqueue(job)

    job_id = run(go)
    click.echo(json.dumps({"id": job_id}) if as_json else job_id)
