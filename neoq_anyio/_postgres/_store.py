"""The job store: every job query of the PostgreSQL backend, in one owner.

Workers, schedulers, cron and the testing helpers ask the store; none of
them runs SQL or sees a psycopg error. Each method runs its statements in
``neoq_anyio._pg._errors.map_errors``, so the code above knows neoq_anyio's
errors only. This is where the management API
and lease mode's claims belong too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import pq

from neoq_anyio._exceptions import DatabaseError, DuplicateJobError
from neoq_anyio._fingerprint import encode_payload
from neoq_anyio._models import Job
from neoq_anyio._pg._connection import connect
from neoq_anyio._pg._errors import map_errors

from . import _sql

if TYPE_CHECKING:
    from datetime import datetime

    import psycopg

    from neoq_anyio._log import BackendLog
    from neoq_anyio._outcome import Outcome
    from neoq_anyio._pg._connection import AnyioConnection
    from neoq_anyio._pg._pool import ConnectionPool

__all__ = ["JobStore"]

_INERROR = pq.TransactionStatus.INERROR


def _job(row: tuple[Any, ...]) -> Job:
    return Job._from_row(dict(zip(_sql.JOB_COLUMN_NAMES, row, strict=True)))


class JobStore:
    """Runs the backend's job SQL on pooled connections.

    Args:
        pool: where connections come from.
        conninfo: for the testing helpers' own connections, which must work
            after the pool closed.
        log: the backend's log; its ``redact`` scrubs error messages.
    """

    def __init__(self, pool: ConnectionPool, conninfo: str, log: BackendLog) -> None:
        self._pool = pool
        self._conninfo = conninfo
        self._log = log
        self._take: dict[str, str] = {}  # per queue, built with the connection's encoding

    # -- enqueueing ----------------------------------------------------------------------

    async def enqueue(
        self, job: Job, *, notify_due: bool, connection: psycopg.AsyncConnection[Any] | None
    ) -> str:
        """Insert a validated job; returns its id.

        ``notify_due``: announce the job in the statement itself, for a
        caller's session whose TimeZone is not UTC (see ``_sql.insert_job``).

        Raises:
            DuplicateJobError: an unprocessed job with the same queue,
                fingerprint and status exists; nothing was inserted.
            PoolTimeoutError, DatabaseError: as the pool and PostgreSQL fail.
        """
        payload, fingerprint = encode_payload(job.queue, job.payload)
        fingerprint = job.fingerprint or fingerprint
        params: tuple[Any, ...] = (job.queue, fingerprint, payload, job.run_after, job.deadline)
        default_retries = job.max_retries is None
        if not default_retries:
            params += (job.max_retries,)
        query = _sql.insert_job(default_max_retries=default_retries, notify=notify_due)
        with map_errors(self._log.redact, "cannot enqueue the job"):
            if connection is None:
                conn = await self._pool.acquire()  # not `async with`: the hot path
                try:
                    row = await (await conn.execute(query, params)).fetchone()
                finally:
                    await self._pool.release(conn)
            else:
                row = await (await connection.execute(query, params)).fetchone()
        if row is None:
            raise DuplicateJobError(
                f"an unprocessed job with fingerprint {fingerprint} "
                f"is already on queue {job.queue!r}"
            )
        return str(row[0])

    async def claim_tick(self, queue: str, tick: datetime, fingerprint: str, payload: str) -> bool:
        """Claim a cron tick and enqueue its job; whether this claim won."""
        params = {"queue": queue, "tick": tick, "fingerprint": fingerprint, "payload": payload}
        with map_errors(self._log.redact, "cannot enqueue a cron tick"):
            async with self._pool.connection() as conn:
                cur = await conn.execute(_sql.CLAIM_TICK, params)
                return await cur.fetchone() is not None

    # -- running jobs in their own transaction -------------------------------------------

    async def take(self, conn: AnyioConnection, queue: str) -> Job | None:
        """Open the job's transaction on ``conn`` and lock the queue's next due job.

        With no job due, the transaction is rolled back and ``None`` returned.
        """
        with map_errors(self._log.redact, f"cannot take a job from queue {queue!r}"):
            take = self._take.get(queue)
            if take is None:
                take = self._take[queue] = _sql.take_job(queue, conn)
            cur = await conn.execute(take)
            cur.nextset()  # past BEGIN, to the SELECT's rows
            row = await cur.fetchone()
            if row is None:
                await conn.execute(_sql.ROLLBACK)
                return None
        return _job(row)

    def handler_broke_transaction(self, conn: AnyioConnection) -> DatabaseError | None:
        """Why a handler that returned cannot be marked processed: it left the
        job's transaction aborted (it swallowed a database error)."""
        if conn.pgconn.transaction_status == _INERROR:
            return DatabaseError("the handler left the job's transaction aborted")
        return None

    async def record(self, conn: AnyioConnection, job_id: str, outcome: Outcome) -> None:
        """Record ``outcome`` in the job's transaction on ``conn``, and commit."""
        with map_errors(self._log.redact, f"cannot record job {job_id}"):
            await conn.execute(_sql.record_outcome(job_id, outcome, conn))

    # -- the schedulers ------------------------------------------------------------------

    async def future_jobs(self, queues: list[str], window: float) -> list[tuple[str, str, float]]:
        """``(id, queue, seconds until due)`` of jobs due within ``window`` seconds."""
        with map_errors(self._log.redact, "cannot look up future jobs"):
            async with self._pool.connection() as conn:
                cur = await conn.execute(_sql.FutureJobQuery, (queues, window))
                rows = await cur.fetchall()
        return [(str(job_id), queue, max(0.0, seconds)) for job_id, queue, seconds in rows]

    async def queues_with_due_jobs(self, queues: list[str]) -> list[str]:
        """Those of ``queues`` where a job is due now."""
        due = []
        with map_errors(self._log.redact, "cannot look up pending jobs"):
            async with self._pool.connection() as conn:
                for queue in queues:
                    cur = await conn.execute(_sql.PendingJobIDQuery, (queue,))
                    if await cur.fetchone() is not None:
                        due.append(queue)
        return due

    # -- for neoq_anyio.testing ----------------------------------------------------------

    async def count_due(self, queues: list[str]) -> int:
        with map_errors(self._log.redact, "cannot count due jobs"):
            async with self._pool.connection() as conn:
                row = await (await conn.execute(_sql.COUNT_DUE, (queues,))).fetchone()
        return int(row[0]) if row else 0

    async def stored_jobs(self, queue: str | None, *, dead: bool) -> list[Job]:
        """Every job (or dead job), oldest first, on a connection of its own,
        so jobs can be inspected after the backend shut down."""
        query = _sql.select_jobs(dead=dead, queue=queue is not None)
        conn = await connect(self._conninfo, redact=self._log.redact)
        try:
            with map_errors(self._log.redact, "cannot list jobs"):
                cur = await conn.execute(query, (queue,) if queue is not None else None)
                rows = await cur.fetchall()
        finally:
            await conn.close()
        return [_job(row) for row in rows]

    async def fast_forward(self, seconds: float) -> None:
        with map_errors(self._log.redact, "cannot move jobs forward"):
            async with self._pool.connection() as conn:
                await conn.execute(_sql.FAST_FORWARD, (seconds,))
