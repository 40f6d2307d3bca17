"""Every SQL statement the PostgreSQL backend runs, in one place.

Statements with parameters use psycopg's ``%s`` placeholders and the
extended protocol (psycopg prepares them after a few uses). The per-job
statements are built once per queue with the queue inlined as a literal and
run with the simple protocol, so ``BEGIN``, the locking ``SELECT`` and the
``SAVEPOINT`` travel in one round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, LiteralString

from psycopg import sql

if TYPE_CHECKING:
    from psycopg.abc import AdaptContext

__all__ = [
    "JOB_COLUMNS",
    "JOB_COLUMN_NAMES",
    "FutureJobQuery",
    "JobQuery",
    "PendingJobIDQuery",
]

JOB_COLUMNS: Final = (
    "id, fingerprint, queue, status, deadline, payload, retries, max_retries, "
    "run_after, ran_at, created_at, error"
)
JOB_COLUMN_NAMES: Final = tuple(name.strip() for name in JOB_COLUMNS.split(","))

JobQuery: Final[LiteralString] = (
    "SELECT id, fingerprint, queue, status, deadline, payload, retries, max_retries, "
    "run_after, ran_at, created_at, error "
    "FROM neoq_jobs "
    "WHERE queue = %s AND status <> 'processed' AND run_after <= now() "
    "ORDER BY run_after, id "
    "LIMIT 1 FOR UPDATE SKIP LOCKED"
)
"""Takes the next due job of a queue and locks its row for the job's transaction.

Unlike Go neoq's id lookup, workers ask for *the next due job*: a
notification only wakes a worker, so a backlog drains at full concurrency and
processes sharing a database never race for the same row.
"""

PendingJobIDQuery: Final[LiteralString] = (
    "SELECT id FROM neoq_jobs "
    "WHERE queue = %s AND status <> 'processed' AND run_after <= now() "
    "ORDER BY run_after, id LIMIT 1"
)
"""Finds whether a queue has a due job that no notification announced."""

FutureJobQuery: Final[LiteralString] = (
    "SELECT id, queue, extract(epoch FROM run_after - clock_timestamp())::float8 "
    "FROM neoq_jobs "
    "WHERE queue = ANY(%s) AND status <> 'processed' "
    "AND run_after > now() AND run_after <= now() + make_interval(secs => %s) "
    "ORDER BY run_after LIMIT 1000"
)
"""Lists jobs that come due within the future-job window, with seconds until due
(measured on the database's clock, so the process clock's skew does not matter)."""

SAVEPOINT: Final = "neoq_job"


_INSERT_JOB: Final = {
    (True, False): (
        "INSERT INTO neoq_jobs (queue, fingerprint, payload, run_after, deadline) "
        "VALUES (%s, %s, %s::jsonb, coalesce(%s, now()), %s) "
        "ON CONFLICT DO NOTHING RETURNING id"
    ),
    (False, False): (
        "INSERT INTO neoq_jobs (queue, fingerprint, payload, run_after, deadline, max_retries) "
        "VALUES (%s, %s, %s::jsonb, coalesce(%s, now()), %s, %s) "
        "ON CONFLICT DO NOTHING RETURNING id"
    ),
    (True, True): (
        "INSERT INTO neoq_jobs (queue, fingerprint, payload, run_after, deadline) "
        "VALUES (%s, %s, %s::jsonb, coalesce(%s, now()), %s) "
        "ON CONFLICT DO NOTHING RETURNING id, pg_notify(queue, id::text)"
    ),
    (False, True): (
        "INSERT INTO neoq_jobs (queue, fingerprint, payload, run_after, deadline, max_retries) "
        "VALUES (%s, %s, %s::jsonb, coalesce(%s, now()), %s, %s) "
        "ON CONFLICT DO NOTHING RETURNING id, pg_notify(queue, id::text)"
    ),
}


def insert_job(*, default_max_retries: bool, notify: bool = False) -> LiteralString:
    """The INSERT for one job; ``ON CONFLICT DO NOTHING`` turns a duplicate into
    an empty result instead of an error that would abort the caller's transaction.

    ``notify`` announces the job explicitly, for sessions whose TimeZone is
    not UTC: there Go neoq's trigger, which compares ``run_after`` with
    ``timezone('utc', created_at)``, misses due jobs east of Greenwich.
    """
    return _INSERT_JOB[default_max_retries, notify]


def is_utc(timezone: str | None) -> bool:
    """Whether a session TimeZone setting is UTC (the trigger's assumption)."""
    return (timezone or "").upper() in _UTC_NAMES


_UTC_NAMES: Final = frozenset(
    {
        "UTC",
        "ETC/UTC",
        "GMT",
        "ETC/GMT",
        "UCT",
        "ETC/UCT",
        "ZULU",
        "ETC/ZULU",
        "UNIVERSAL",
        "ETC/UNIVERSAL",
        "Z",
        "GMT0",
        "ETC/GMT0",
        "GMT+0",
        "GMT-0",
        "ETC/GMT+0",
        "ETC/GMT-0",
        "GREENWICH",
        "ETC/GREENWICH",
    }
)


def take_job(queue: str, context: AdaptContext) -> str:
    """``BEGIN; <JobQuery>; SAVEPOINT``: one round trip to start a job.

    The savepoint lets a failed handler's writes roll back while the job's
    row lock, and the failure record, stay in the same transaction.
    """
    select = sql.SQL(JobQuery.replace("%s", "{}")).format(sql.Literal(queue))
    return f"BEGIN; {select.as_string(context)}; SAVEPOINT {SAVEPOINT}"


def complete_job(job_id: int, retries: int) -> str:
    """Mark a job processed and commit."""
    return (
        f"UPDATE neoq_jobs SET status = 'processed', ran_at = now(), error = NULL, "
        f"retries = {retries:d} WHERE id = {job_id:d}; COMMIT"
    )


def fail_job(job_id: int, retries: int, error: str, delay: float, context: AdaptContext) -> str:
    """Undo the handler's writes, record the failure, schedule the retry, commit."""
    message = sql.Literal(error).as_string(context)
    return (
        f"ROLLBACK TO SAVEPOINT {SAVEPOINT}; "
        f"UPDATE neoq_jobs SET status = 'failed', ran_at = now(), error = {message}, "
        f"retries = {retries:d}, run_after = clock_timestamp() + make_interval(secs => {delay!r}) "
        f"WHERE id = {job_id:d}; COMMIT"
    )


def bury_job(job_id: int, retries: int, error: str, context: AdaptContext) -> str:
    """Undo the handler's writes and move the job to neoq_dead_jobs, then commit."""
    message = sql.Literal(error).as_string(context)
    return (
        f"ROLLBACK TO SAVEPOINT {SAVEPOINT}; "
        "WITH dead AS (DELETE FROM neoq_jobs WHERE id = "
        f"{job_id:d} RETURNING id, queue, fingerprint, payload, max_retries, deadline) "
        "INSERT INTO neoq_dead_jobs "
        "(id, queue, fingerprint, payload, retries, max_retries, error, deadline) "
        f"SELECT id, queue, fingerprint, payload, {retries:d}, max_retries, {message}, deadline "
        "FROM dead; COMMIT"
    )


SESSION_SETUP: Final = "SET TimeZone = 'UTC'"
"""Every pooled session works in UTC: timestamps come back in UTC, and Go
neoq's trigger compares ``run_after`` with ``timezone('utc', created_at)``,
which is only right when the session's zone is UTC."""
