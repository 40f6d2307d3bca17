"""The job store: every job query of the PostgreSQL backend, in one owner.

Workers, schedulers, cron and the testing helpers ask the store; none of
them runs SQL or sees a psycopg error. Each method runs its statements in
``neoq_anyio._pg._errors.map_errors``, so the code above knows neoq_anyio's
errors only. This is where the management API
and lease mode's claims belong too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from psycopg import pq

from neoq_anyio._exceptions import DatabaseError, DuplicateJobError
from neoq_anyio._fingerprint import encode_payload
from neoq_anyio._models import Job
from neoq_anyio._outcome import hold_back_seconds, scrubbed
from neoq_anyio._pg._connection import connect
from neoq_anyio._pg._errors import map_errors

from . import _sql
from ._watermark import Watermark

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    import psycopg

    from neoq_anyio._log import BackendLog
    from neoq_anyio._outcome import Outcome
    from neoq_anyio._pg._connection import AnyioConnection
    from neoq_anyio._pg._pool import ConnectionPool

__all__ = ["JobStore", "job_from_row"]

_INERROR = pq.TransactionStatus.INERROR
_OK = pq.ConnStatus.OK
_FORGET_HELD_BACK = 3600.0  # seconds after its hold-back ends that a job's failure count is kept


@dataclass(slots=True)
class _HeldBack:
    """A job this process leaves alone until ``until`` (AnyIO's clock)."""

    queue: str
    failures: int
    until: float


def job_from_row(row: tuple[Any, ...], columns: tuple[str, ...] = _sql.JOB_COLUMN_NAMES) -> Job:
    """A job from a row holding ``columns`` first (``Job.STORED_COLUMNS``'s
    order); columns after them (say, ``pg_notify``'s result) are ignored."""
    return Job._from_columns(row[: len(columns)])


class JobStore:
    """Runs the backend's job SQL on pooled connections.

    Args:
        pool: where connections come from.
        conninfo: for the testing helpers' own connections, which must work
            after the pool closed.
        log: the backend's log; its ``redact`` scrubs error messages.
        per_transaction: behind a transaction pooler, the settings each
            transaction carries (``_sql.PerTransaction``); empty otherwise.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        conninfo: str,
        log: BackendLog,
        *,
        per_transaction: _sql.PerTransaction = _sql.DIRECT,
    ) -> None:
        self._pool = pool
        self._conninfo = conninfo
        self._log = log
        self._settings = per_transaction
        self._claim_tick = _sql.CLAIM_TICK_ANNOUNCED if per_transaction.pooled else _sql.CLAIM_TICK
        self._take: dict[str, _sql.TakeQuery] = {}  # per queue, quoted in the connection's encoding
        self.watermarks: dict[str, Watermark] = {}  # per queue: where claims start
        self._held_back: dict[str, _HeldBack] = {}  # by job id: see hold_back()
        self._mine: set[str] = set()  # ids of the jobs this process's workers run

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
        prioritized = job.priority != 0
        if prioritized:
            params += (job.priority,)
        traced = job._trace_context is not None
        if traced:
            params += (json.dumps(job._trace_context),)
        query = _sql.insert_job(
            default_max_retries=default_retries,
            notify=notify_due,
            traced=traced,
            prioritized=prioritized,
        )
        with map_errors(self._log.redact, "cannot enqueue the job"):
            if connection is None:
                if self._settings.writes:  # behind a pooler; the caller's own keep theirs
                    query += self._settings.writes
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
                cur = await conn.execute(self._claim_tick, params)
                return await cur.fetchone() is not None

    # -- running jobs in their own transaction -------------------------------------------

    async def take(
        self,
        conn: AnyioConnection,
        queue: str,
        *,
        higher_first: bool = True,
        may_go_on: Callable[[], bool] = lambda: True,
    ) -> Job | None:
        """Open the job's transaction on ``conn`` and lock the queue's next due job.

        ``higher_first``: look for jobs of a higher priority than the
        watermark's first (see ``TakeQuery.text``); a worker draining a queue
        skips that look, which costs a third of a take, until a notification
        announces a job.

        With no job due, the transaction is rolled back and ``None`` returned.
        Jobs held back (``hold_back``) are not taken, nor are jobs this
        process still runs (see ``done``), whose row lock may have died with
        their session. Call ``done`` once the job is recorded.

        A take may need several statements; ``may_go_on()`` is asked before
        each after the first, and a False answer (the queue was paused
        meanwhile) ends the take with nothing taken.
        """
        watermark = self.watermark(queue)
        with map_errors(self._log.redact, f"cannot take a job from queue {queue!r}"):
            skip = self._skipped(queue) if self._held_back else []
            row = await self._take_after(conn, queue, skip, watermark, higher_first, may_go_on)
            while row is not None and str(row[0]) in self._mine:
                # Still running here, but unlocked: its session ended under it.
                # Look again without the jobs running here, as they are now:
                # one may have lost its session since ``skip`` was made (each
                # turn skips one more job, so this ends).
                await conn.execute(_sql.ROLLBACK)
                if not may_go_on():
                    return None
                skip = [*skip, *map(int, self._mine)]
                row = await self._take_after(conn, queue, skip, watermark, higher_first, may_go_on)
            if row is None:
                return None
        job = job_from_row(row, _sql.TAKE_COLUMN_NAMES)
        assert job.run_after is not None  # taken: due
        watermark.advance((-job.priority, job.run_after, int(row[0])))
        self._mine.add(str(job.id))
        return job

    def watermark(self, queue: str) -> Watermark:
        """Where ``queue``'s claims in this process start (see ``_watermark``)."""
        watermark = self.watermarks.get(queue)
        if watermark is None:
            watermark = self.watermarks[queue] = Watermark()
        return watermark

    async def _take_after(
        self,
        conn: AnyioConnection,
        queue: str,
        skip: list[int],
        watermark: Watermark,
        higher_first: bool,
        may_go_on: Callable[[], bool],
    ) -> tuple[Any, ...] | None:
        """The next job after the watermark, else (it is set) at or before it."""
        position = watermark.position
        if position is None:
            return await self._take_row(conn, queue, skip)
        row = await self._take_row(conn, queue, skip, position, higher_first=higher_first)
        if row is None and may_go_on():
            row = await self._take_row(conn, queue, skip, position, behind=True)
        return row

    async def _take_row(
        self,
        conn: AnyioConnection,
        queue: str,
        skip: list[int],
        position: _sql.Position | None = None,
        *,
        behind: bool = False,
        higher_first: bool = True,
    ) -> tuple[Any, ...] | None:
        query = self._take.get(queue)
        if query is None:
            query = self._take[queue] = _sql.TakeQuery(queue, conn, self._settings.opens)
        if skip or position is not None:  # moves with every take: built, not cached
            take = query.text(
                skip=skip, position=position, behind=behind, higher_first=higher_first
            )
        else:
            take = query.plain
        cur = await conn.execute(take)
        cur.nextset()  # past BEGIN, to the SELECT's rows
        row = await cur.fetchone()
        if row is None:
            await conn.execute(_sql.ROLLBACK)
        return row

    def done(self, job: Job) -> None:
        """``take``'s job is no longer this process's: recorded, or given up."""
        self._mine.discard(str(job.id))

    def handler_broke_transaction(self, conn: AnyioConnection) -> DatabaseError | None:
        """Why a handler that returned cannot be marked processed: it left the
        job's transaction aborted (it caught a database error and went on).

        The message quotes that error as the connection last reported it, so
        the job's record says what went wrong.
        """
        pgconn = conn.pgconn
        if pgconn.transaction_status != _INERROR:
            return None
        message = "the handler left the job's transaction aborted"
        lines = [line.strip() for line in pgconn.get_error_message().splitlines()]
        cause = " ".join(line for line in lines if line)
        if cause:
            # libpq's text starts with the severity ("ERROR:  division by zero").
            severity, sep, rest = cause.partition(":")
            if sep and severity.isupper():
                cause = rest.strip()
            message += f" after a database error it caught: {cause}"
        return DatabaseError(self._log.redact(message))

    async def record(self, conn: AnyioConnection, job_id: str, outcome: Outcome) -> None:
        """Record ``outcome`` in the job's transaction on ``conn``, and commit.

        Raises:
            DatabaseError: the transaction could not record it, or could not
                commit (a deferred constraint the handler's writes break, a
                lost connection); nothing was recorded, and the transaction
                is no longer usable: see ``record_unlocked``.
        """
        doing = (
            f"cannot commit job {job_id}'s transaction"
            if outcome.kind == "processed"
            else f"cannot record job {job_id}"
        )
        with map_errors(self._log.redact, doing):
            await conn.execute(
                _sql.record_outcome(job_id, scrubbed(outcome, self._log.redact), conn)
            )
        if self._held_back:
            self._held_back.pop(job_id, None)

    def still_in_transaction(self, conn: AnyioConnection) -> bool:
        """Whether the job's transaction on ``conn`` survived a failed ``record``:
        aborted but open, so it still holds the row lock and can record again
        (a failure rolls back to the job's savepoint first)."""
        pgconn = conn.pgconn
        return pgconn.status == _OK and pgconn.transaction_status == _INERROR

    async def record_unlocked(self, conn: AnyioConnection, taken: Job, outcome: Outcome) -> bool:
        """Record ``outcome`` for ``taken`` (the job as ``take`` returned it) in a
        new transaction, after its own transaction on ``conn`` failed to.

        ``conn`` is reused once its failed transaction is rolled back, which
        also frees the job's row; a connection that is broken is left for the
        pool to discard, and a fresh one is borrowed. The write is guarded
        (``_sql.record_unlocked``): it changes the job only if no one took,
        ran or recorded it since. Returns whether it wrote.

        Raises:
            DatabaseError: PostgreSQL failed here too.
            PoolTimeoutError: a fresh connection was needed and none was free.
        """
        assert taken.id is not None  # a stored job
        job_id = taken.id
        columns = {
            "status": taken.status,
            "retries": taken.retries,
            "run_after": taken.run_after,
            "ran_at": taken.ran_at,
        }
        outcome = scrubbed(outcome, self._log.redact)
        # Other workers of this process do not take the job meanwhile: it is
        # still this one's until ``done``.
        try:
            with map_errors(self._log.redact, f"cannot record job {job_id}"):
                if conn.pgconn.status == _OK:
                    await conn.execute(_sql.ROLLBACK)
                    row = await self._write_unlocked(conn, job_id, columns, outcome)
                else:
                    async with self._pool.connection() as fresh:
                        row = await self._write_unlocked(fresh, job_id, columns, outcome)
        except DatabaseError as exc:
            if exc.sqlstate != _sql.LOCK_NOT_AVAILABLE:
                raise
            row = None  # a live worker elsewhere holds the job: it is theirs
        self._held_back.pop(job_id, None)
        return row is not None

    @staticmethod
    async def _write_unlocked(
        conn: AnyioConnection, job_id: str, columns: dict[str, Any], outcome: Outcome
    ) -> tuple[Any, ...] | None:
        cur = await conn.execute(_sql.record_unlocked(job_id, columns, outcome, conn))
        for _ in range(_sql.RECORD_UNLOCKED_RESULT):
            cur.nextset()
        return await cur.fetchone()

    def hold_back(self, job: Job) -> float:
        """Leave ``job`` alone in this process for a while, because its outcome
        could not be recorded even in a new transaction; returns for how many
        seconds (``hold_back_seconds``, growing with each failure in a row).

        The job stays due in the database; ``take`` skips it until then.
        """
        assert job.id is not None  # a stored job
        now = anyio.current_time()
        previous = self._held_back.pop(job.id, None)
        failures = 1 if previous is None else previous.failures + 1
        seconds = hold_back_seconds(failures)
        self._held_back[job.id] = _HeldBack(job.queue, failures, now + seconds)
        return seconds

    def _skipped(self, queue: str) -> list[int]:
        """Ids of ``queue``'s jobs held back now; forgets long-expired ones."""
        now = anyio.current_time()
        skip = []
        for job_id, held in list(self._held_back.items()):
            if held.until > now:
                if held.queue == queue:
                    skip.append(int(job_id))
            elif now - held.until > _FORGET_HELD_BACK:
                del self._held_back[job_id]
        return skip

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
        return [job_from_row(row) for row in rows]

    async def fast_forward(self, seconds: float) -> None:
        with map_errors(self._log.redact, "cannot move jobs forward"):
            async with self._pool.connection() as conn:
                await conn.execute(_sql.FAST_FORWARD, (seconds,))
        for watermark in self.watermarks.values():  # jobs moved behind them
            watermark.reset()
