"""``enqueue_many`` on PostgreSQL: one INSERT for the whole batch.

The jobs travel as one array per column and come out of ``unnest`` in input
order; ``ON CONFLICT DO NOTHING`` skips those that an unprocessed job already
stored blocks, so the statement never fails on a duplicate and never aborts a
caller's transaction. Jobs repeating an earlier job of the same batch (same
queue and fingerprint) are left out before sending: the first one is stored,
as if the jobs were enqueued one by one. The rows sent are then unique by
queue and fingerprint, which is what maps the ids the INSERT returns back to
the jobs: ``RETURNING`` can name only the table's columns, not the input's
position.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from neoq_anyio._batch import encode_batch
from neoq_anyio._pg._errors import map_errors

if TYPE_CHECKING:
    from collections.abc import Sequence

    import psycopg

    from neoq_anyio._log import BackendLog
    from neoq_anyio._models import Job
    from neoq_anyio._pg._pool import ConnectionPool

__all__ = ["DEFAULT_MAX_RETRIES", "BatchEnqueuer", "insert_jobs"]

DEFAULT_MAX_RETRIES: Final = 23
"""``neoq_jobs.max_retries``' column default (schema.sql): what a job without
``max_retries`` gets, as the one-job INSERT, which leaves the column out, does."""


def insert_jobs(*, notify: bool) -> str:
    """The INSERT for a batch: eight arrays, one per column, in the jobs' order
    (queue, fingerprint, payload as JSON text, run_after, deadline,
    max_retries, trace_context as JSON text, priority; NULL for "not given").

    Returns each stored job's ``id, queue, fingerprint``. ``notify``
    announces the due ones explicitly, for sessions whose TimeZone is not UTC
    (see ``_sql.insert_job``).
    """
    announce = (
        ", CASE WHEN run_after <= now() THEN pg_notify(queue, id::text) END" if notify else ""
    )
    return (
        "INSERT INTO neoq_jobs "
        "(queue, fingerprint, payload, run_after, deadline, max_retries, trace_context, "
        "priority) "
        "SELECT queue, fingerprint, payload::jsonb, coalesce(run_after, now()), deadline, "
        f"coalesce(max_retries, {DEFAULT_MAX_RETRIES}), trace_context::jsonb, priority "
        "FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[], "
        "%s::timestamptz[], %s::int4[], %s::text[], %s::int2[]) WITH ORDINALITY "
        "AS batch (queue, fingerprint, payload, run_after, deadline, max_retries, "
        "trace_context, priority, position) "
        "ORDER BY position "
        f"ON CONFLICT DO NOTHING RETURNING id, queue, fingerprint{announce}"
    )


_INSERT_JOBS: Final = {notify: insert_jobs(notify=notify) for notify in (False, True)}


class BatchEnqueuer:
    """Inserts batches of jobs on pooled connections, or a caller's.

    Args:
        pool: where connections come from.
        log: the backend's log; its ``redact`` scrubs error messages.
    """

    def __init__(self, pool: ConnectionPool, log: BackendLog) -> None:
        self._pool = pool
        self._log = log

    async def enqueue_many(
        self,
        jobs: Sequence[Job],
        *,
        notify_due: bool,
        connection: psycopg.AsyncConnection[Any] | None,
    ) -> list[str | None]:
        """Insert validated jobs in one statement; their ids in input order,
        ``None`` for a duplicate (of a stored job or an earlier one of ``jobs``).

        Raises:
            InvalidJobError: a payload cannot be stored (named by its index);
                nothing was inserted.
            PoolTimeoutError, DatabaseError: as the pool and PostgreSQL fail;
                nothing was inserted.
        """
        encoded = encode_batch(jobs)
        first: dict[tuple[str, str], int] = {}  # (queue, fingerprint): the job to store
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
        queues, fingerprints, payloads, run_afters, deadlines, max_retries, traces, priorities = (
            columns
        )
        for index, (job, (payload, fingerprint)) in enumerate(zip(jobs, encoded, strict=True)):
            key = (job.queue, fingerprint)
            if key in first:
                continue  # a duplicate within the batch: None, as its twin is stored first
            first[key] = index
            queues.append(job.queue)
            fingerprints.append(fingerprint)
            payloads.append(payload)
            run_afters.append(job.run_after)
            deadlines.append(job.deadline)
            max_retries.append(job.max_retries)
            traced = job._trace_context
            traces.append(None if traced is None else json.dumps(traced))
            priorities.append(job.priority)
        query = _INSERT_JOBS[notify_due]
        with map_errors(self._log.redact, f"cannot enqueue {len(jobs)} jobs"):
            if connection is None:
                conn = await self._pool.acquire()
                try:
                    rows = await (await conn.execute(query, columns)).fetchall()
                finally:
                    await self._pool.release(conn)
            else:
                rows = await (await connection.execute(query, columns)).fetchall()
        ids: list[str | None] = [None] * len(jobs)
        for row in rows:
            ids[first[row[1], row[2]]] = str(row[0])
        return ids
