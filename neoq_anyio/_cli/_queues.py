"""``queues list|pause|resume``: paused queues from the command line."""

from __future__ import annotations

import click

from neoq_anyio._exceptions import ConfigurationError
from neoq_anyio._models import check_queue_name

from ._base import cli, dsn_option, echo_json, json_option, usage, with_backend


@cli.group()
def queues() -> None:
    """List queues, pause or resume them."""


@queues.command("list")
@dsn_option
@json_option
def list_(dsn: str | None, as_json: bool) -> None:
    """Queues that hold jobs or are paused, and whether they are paused."""
    stats = with_backend(dsn, lambda nq: nq.queue_stats())
    if as_json:
        echo_json([{"queue": q.queue, "paused": q.paused} for q in stats])
        return
    for q in stats:
        click.echo(f"{q.queue}  {'paused' if q.paused else 'active'}")


@queues.command()
@click.argument("queue")
@dsn_option
@json_option
def pause(queue: str, dsn: str | None, as_json: bool) -> None:
    """Stop every process from taking jobs of QUEUE until it is resumed.

    The pause is stored in the database: it outlasts restarts and holds for
    workers started later. Workers follow within a second or two; jobs
    running finish, and jobs enqueued meanwhile wait.
    """
    _set(queue, dsn, as_json, paused=True)


@queues.command()
@click.argument("queue")
@dsn_option
@json_option
def resume(queue: str, dsn: str | None, as_json: bool) -> None:
    """Let workers take jobs of a paused QUEUE again."""
    _set(queue, dsn, as_json, paused=False)


def _set(queue: str, dsn: str | None, as_json: bool, *, paused: bool) -> None:
    try:
        check_queue_name(queue, ConfigurationError)
    except ConfigurationError as exc:
        usage(f"QUEUE: {exc}")
    with_backend(dsn, lambda nq: nq.pause_queue(queue) if paused else nq.resume_queue(queue))
    if as_json:
        echo_json({"queue": queue, "paused": paused})
    else:
        click.echo(f"queue {queue} {'paused' if paused else 'resumed'}")
