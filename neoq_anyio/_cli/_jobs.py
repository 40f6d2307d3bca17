"""``stats``, ``jobs list|show|retry|cancel|delete`` and ``prune``: managing jobs without SQL."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, cast

import click

from neoq_anyio._durations import DurationSyntaxError, parse_go_duration
from neoq_anyio._open import DEFAULT_KEEP_DEAD, DEFAULT_KEEP_PROCESSED

from ._base import (
    Failure,
    cli,
    dsn_option,
    echo_json,
    job_document,
    json_option,
    usage,
    with_backend,
)

if TYPE_CHECKING:
    from neoq_anyio._models import Job, JobStatus

_STATUSES = ("new", "running", "failed", "processed", "dead")


def _show(job: Job, as_json: bool) -> None:
    if as_json:
        echo_json(job_document(job))
        return
    for key, value in job_document(job).items():
        click.echo(f"{key:12} {value}")


@cli.command()
@dsn_option
@json_option
def stats(dsn: str | None, as_json: bool) -> None:
    """Per queue: jobs due, scheduled, running, failed, processed, dead."""
    queues = with_backend(dsn, lambda nq: nq.queue_stats())
    if as_json:
        echo_json([dataclasses.asdict(q) for q in queues])
        return
    columns = ("due", "scheduled", "running", "failed", "processed", "dead")
    width = max([5, *(len(q.queue) for q in queues)])
    click.echo(f"{'queue':{width}}  " + "  ".join(f"{c:>9}" for c in columns) + "  oldest due")
    for q in queues:
        counts = "  ".join(f"{getattr(q, c):>9}" for c in columns)
        oldest = "-" if q.oldest_due_seconds is None else f"{q.oldest_due_seconds:.0f} s"
        paused = "  (paused)" if q.paused else ""
        click.echo(f"{q.queue:{width}}  {counts}  {oldest}{paused}")


@cli.group()
def jobs() -> None:
    """List, show, retry, cancel or delete jobs."""


@jobs.command("list")
@dsn_option
@click.option("--queue", help="Only this queue's jobs.")
@click.option("--status", type=click.Choice(_STATUSES), help="Only jobs in this status.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@json_option
def list_(
    dsn: str | None, queue: str | None, status: str | None, limit: int, as_json: bool
) -> None:
    """Jobs, newest first: all statuses, dead included, unless filtered."""
    found = with_backend(
        dsn,
        lambda nq: nq.list_jobs(queue=queue, status=cast("JobStatus | None", status), limit=limit),
    )
    if as_json:
        echo_json([job_document(job) for job in found])
        return
    for job in found:
        error = f"  {job.error}" if job.error else ""
        click.echo(f"{job.id:>10}  {job.queue}  {job.status}  retries={job.retries}{error}")


@jobs.command()
@click.argument("job_id", metavar="ID")
@dsn_option
@json_option
def show(job_id: str, dsn: str | None, as_json: bool) -> None:
    """Show a job, live or dead."""
    job = with_backend(dsn, lambda nq: nq.get_job(job_id))
    if job is None:
        raise Failure(f"no job {job_id}")
    _show(job, as_json)


@jobs.command()
@click.argument("job_id", metavar="ID")
@dsn_option
@json_option
def retry(job_id: str, dsn: str | None, as_json: bool) -> None:
    """Make a dead job, or a failed one waiting for its retry, due now (it keeps its id)."""
    _show(with_backend(dsn, lambda nq: nq.retry_job(job_id)), as_json)


@jobs.command()
@click.argument("job_id", metavar="ID")
@dsn_option
@json_option
def cancel(job_id: str, dsn: str | None, as_json: bool) -> None:
    """Move a job not yet processed to the dead jobs, with the error "cancelled"."""
    if not with_backend(dsn, lambda nq: nq.cancel_job(job_id)):
        raise Failure(f"job {job_id} cannot be cancelled: unknown, processed, dead or running")
    if as_json:
        echo_json({"id": job_id, "cancelled": True})
    else:
        click.echo(f"job {job_id} cancelled")


@jobs.command()
@click.argument("job_id", metavar="ID")
@dsn_option
@json_option
def delete(job_id: str, dsn: str | None, as_json: bool) -> None:
    """Delete a job, live or dead."""
    if not with_backend(dsn, lambda nq: nq.delete_job(job_id)):
        raise Failure(f"no job {job_id} to delete (unknown, or running)")
    if as_json:
        echo_json({"id": job_id, "deleted": True})
    else:
        click.echo(f"job {job_id} deleted")


def _duration(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_go_duration(text)
    except DurationSyntaxError as exc:
        usage(f"--older-than {text!r}: {exc.reason} (use seconds or a Go duration: 36h, 7h30m)")


@cli.command()
@dsn_option
@click.option(
    "--older-than",
    metavar="DURATION",
    help="Delete processed and dead jobs older than this (seconds or 36h, 30m ...); "
    "default: the retention settings (1 day processed, 30 days dead).",
)
@json_option
def prune(dsn: str | None, older_than: str | None, as_json: bool) -> None:
    """Delete old processed jobs (by when they ran) and dead jobs (by when they died)."""
    age = _duration(older_than)
    processed, dead = with_backend(
        dsn,
        lambda nq: nq._prune(
            processed_age=DEFAULT_KEEP_PROCESSED if age is None else age,
            dead_age=DEFAULT_KEEP_DEAD if age is None else age,
        ),
    )
    if as_json:
        echo_json({"processed": processed, "dead": dead})
    else:
        click.echo(f"deleted {processed} processed and {dead} dead jobs")
