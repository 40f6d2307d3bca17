"""The management API's and retention's queries: get, list, retry, cancel,
delete, count and prune jobs; pause and resume queues.

Kept apart from ``_store.py`` (the workers' hot path): these serve operators,
the command line and the dashboard. Like the store, every method runs its
statements in ``map_errors`` and knows neoq_anyio's errors only. A job being
run now in transaction mode holds its row lock; statements skip it
(``SKIP LOCKED``) rather than wait for the job to end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import anyio

from neoq_anyio._exceptions import DatabaseError, DuplicateJobError, NoJobError
from neoq_anyio._models import Job, QueueStats
from neoq_anyio._pg._errors import map_errors

from . import _sql
from ._store import job_from_row

if TYPE_CHECKING:
    from neoq_anyio._log import BackendLog
    from neoq_anyio._models import JobStatus
    from neoq_anyio._pg._connection import AnyioConnection
    from neoq_anyio._pg._pool import ConnectionPool

__all__ = ["JobAdmin", "job_number"]

_UNIQUE_VIOLATION: Final = "23505"
# Any constant works; "prune" in ASCII, shared by every process.
_PRUNE_LOCK: Final = 0x7072756E65
_PRUNE_BATCH: Final = 1000
_PRUNE_PAUSE: Final = 0.01  # seconds between batches, so pruning never hogs the server


def job_number(job_id: str) -> int | None:
    """A job id as the database's bigint, or ``None`` for text no job can have."""
    if not (isinstance(job_id, str) and job_id.isascii() and job_id.isdigit()):
        return None
    number = int(job_id)
    return number if number < 2**63 else None


class JobAdmin:
    """Runs the management and retention statements on pooled connections."""

    def __init__(self, pool: ConnectionPool, log: BackendLog) -> None:
        self._pool = pool
        self._log = log

    async def get_job(self, job_id: str) -> Job | None:
        number = job_number(job_id)
        if number is None:
            return None
        with map_errors(self._log.redact, f"cannot read job {job_id}"):
            async with self._pool.connection() as conn:
                row = await (await conn.execute(_sql.GET_JOB, {"id": number})).fetchone()
        return job_from_row(row) if row else None

    async def list_jobs(
        self, *, queue: str | None, status: JobStatus | None, limit: int, before_id: int | None
    ) -> list[Job]:
        query = _sql.list_jobs(queue=queue is not None, status=status, before=before_id is not None)
        params = {"queue": queue, "before": before_id, "limit": limit}
        with map_errors(self._log.redact, "cannot list jobs"):
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(query, params)).fetchall()
        return [job_from_row(row) for row in rows]

    async def retry_job(self, job_id: str) -> Job:
        number = job_number(job_id)
        if number is None:
            raise NoJobError(f"no job {job_id!r}")
        params = {"id": number}
        try:
            with map_errors(self._log.redact, f"cannot retry job {job_id}"):
                async with self._pool.connection() as conn, conn.transaction():
                    row = await (await conn.execute(_sql.RETRY_LIVE_JOB, params)).fetchone()
                    if row is None:
                        row = await self._retry_dead(conn, params, job_id)
        except DatabaseError as exc:
            if exc.sqlstate == _UNIQUE_VIOLATION:  # a processed job's twin is queued
                raise _duplicate(job_id) from None
            raise
        return job_from_row(row)

    async def _retry_dead(
        self, conn: AnyioConnection, params: dict[str, int], job_id: str
    ) -> tuple[Any, ...]:
        """Bring a dead job back, or say why not (inside the caller's transaction)."""
        if await (await conn.execute(_sql.DEAD_JOB_EXISTS, params)).fetchone() is None:
            # Not dead either: unknown, or being run now (its row is locked).
            live = await (await conn.execute(_sql.LIVE_JOB, params)).fetchone()
            if live is None:
                raise NoJobError(f"no job {job_id!r}")
            return live
        row = await (await conn.execute(_sql.RETRY_DEAD_JOB, params)).fetchone()
        if row is None:
            raise _duplicate(job_id)  # the transaction rolls the DELETE back
        return row

    async def cancel_job(self, job_id: str) -> bool:
        number = job_number(job_id)
        if number is None:
            return False
        with map_errors(self._log.redact, f"cannot cancel job {job_id}"):
            async with self._pool.connection() as conn:
                row = await (await conn.execute(_sql.CANCEL_JOB, {"id": number})).fetchone()
        return row is not None

    async def delete_job(self, job_id: str) -> bool:
        number = job_number(job_id)
        if number is None:
            return False
        with map_errors(self._log.redact, f"cannot delete job {job_id}"):
            async with self._pool.connection() as conn:
                row = await (await conn.execute(_sql.DELETE_JOB, {"id": number})).fetchone()
        return bool(row and row[0])

    async def queue_stats(self) -> list[QueueStats]:
        """Every queue with jobs, live or dead, or paused, by name."""
        with map_errors(self._log.redact, "cannot count jobs"):
            async with self._pool.connection() as conn:
                live = await (await conn.execute(_sql.QUEUE_STATS)).fetchall()
                dead: dict[str, int] = dict(
                    await (await conn.execute(_sql.DEAD_BY_QUEUE)).fetchall()
                )
                paused = await _paused_on(conn)
        stats = {
            queue: QueueStats(
                queue,
                due,
                scheduled,
                running,
                failed,
                processed,
                dead.get(queue, 0),
                oldest,
                queue in paused,
            )
            for queue, due, scheduled, running, failed, processed, oldest in live
        }
        for queue, count in dead.items():
            if queue not in stats:
                stats[queue] = QueueStats(queue, 0, 0, 0, 0, 0, count, None, queue in paused)
        for queue in paused - stats.keys():  # paused before any job came
            stats[queue] = QueueStats(queue, 0, 0, 0, 0, 0, 0, None, True)
        return [stats[queue] for queue in sorted(stats)]

    async def set_paused(self, queue: str, paused: bool) -> bool:
        """Pause or resume ``queue`` and announce it to every listening
        process; whether that changed anything."""
        statement = _sql.PAUSE_QUEUE if paused else _sql.RESUME_QUEUE
        verb = "pause" if paused else "resume"
        with map_errors(self._log.redact, f"cannot {verb} queue {queue!r}"):
            async with self._pool.connection() as conn:
                row = await (await conn.execute(statement, {"queue": queue})).fetchone()
        return row is not None

    async def paused_queues(self) -> frozenset[str]:
        """The queues paused now."""
        with map_errors(self._log.redact, "cannot read the paused queues"):
            async with self._pool.connection() as conn:
                return await _paused_on(conn)

    async def prune(
        self, *, processed_age: float | None, dead_age: float | None
    ) -> tuple[int, int]:
        """Delete processed jobs that ran, and dead jobs that died, longer ago
        than the ages (seconds; ``None``: keep them), in small batches.

        Returns how many of each were deleted; ``(0, 0)`` at once when another
        process is pruning.
        """
        processed = (
            0 if processed_age is None else await self._prune(_sql.PRUNE_PROCESSED, processed_age)
        )
        dead = 0 if dead_age is None else await self._prune(_sql.PRUNE_DEAD, dead_age)
        return processed, dead

    async def _prune(self, statement: bytes, age: float) -> int:
        deleted = 0
        params = {"age": age, "batch": _PRUNE_BATCH}
        while True:
            with map_errors(self._log.redact, "cannot prune jobs"):
                async with self._pool.connection() as conn, conn.transaction():
                    cur = await conn.execute(_sql.PRUNE_LOCK, (_PRUNE_LOCK,))
                    row = await cur.fetchone()
                    if not (row and row[0]):
                        return deleted  # another process prunes now
                    batch = (await conn.execute(statement, params)).rowcount
            deleted += batch
            if batch < _PRUNE_BATCH:
                return deleted
            await anyio.sleep(_PRUNE_PAUSE)


async def _paused_on(conn: AnyioConnection) -> frozenset[str]:
    rows = await (await conn.execute(_sql.PAUSED_QUEUES)).fetchall()
    return frozenset(queue for (queue,) in rows)


def _duplicate(job_id: str) -> DuplicateJobError:
    return DuplicateJobError(
        f"cannot retry job {job_id}: an unprocessed job with the same queue, fingerprint "
        "and status is queued"
    )
