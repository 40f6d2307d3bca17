"""Lease mode's job SQL: claims, heartbeats, acknowledgements and releases.

A leased job holds no connection while it runs. It carries a lease in its
row: a fencing token (the id of the transaction that claimed it) and an
expiry. Every write of the lease holder (completing, failing, extending,
releasing, opening the job's transaction) matches the token, so a worker
whose lease was lost, and the job claimed again elsewhere, changes nothing.
An expired lease needs no rescuer: claims take expired leases as they take
ready jobs (``LeaseStore.claim_expired``), counting the lost attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from neoq_anyio._exceptions import JobLostError, LeaseLostError
from neoq_anyio._models import Job
from neoq_anyio._outcome import Outcome, describe_error, scrubbed
from neoq_anyio._pg._errors import map_errors

from . import _sql
from ._limits import EXTEND_SLOTS, FREE_SLOTS, LIMITED_COLUMNS, claim_limited, ensure_limits

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from neoq_anyio._log import BackendLog
    from neoq_anyio._models import Handler
    from neoq_anyio._pg._connection import AnyioConnection
    from neoq_anyio._pg._pool import ConnectionPool

    from ._sql import Position

__all__ = ["LOST_ERROR", "Lease", "LeaseStore", "Limited", "Limits"]

LOST_ERROR = describe_error(JobLostError("the worker running the job was lost (its lease expired)"))
"""The ``error`` stored when a lost lease is claimed again."""


class Lease:
    """A claimed job and what its lease holder must remember.

    Attributes:
        job: the job as its handler sees it: its stored status (``new`` or
            ``failed``, as in transaction mode), ``retries`` counting this
            attempt.
        id: the job's id.
        token: the fencing token every write matches.
        previous_retries: ``retries`` before the claim, restored on release.
        took_over: the claim took over a lost lease (an attempt that counts).
        position: the job's place in claim order (``_watermark``).
    """

    # A plain class, not a frozen dataclass: claims build thousands a second.
    __slots__ = ("id", "job", "position", "previous_retries", "token", "took_over")

    def __init__(self, row: Sequence[Any]) -> None:
        """From a claimed row (``_sql.LEASE_COLUMN_NAMES``; columns after
        them, per-transaction settings behind a pooler, are ignored)."""
        self.job = job = Job._from_columns(row)  # as stored (new or failed)
        self.id: str = job.id  # type: ignore[assignment]  # a stored job has one
        self.previous_retries: int = row[_PREVIOUS_RETRIES]
        self.token = int(row[_TOKEN])
        self.took_over = row[_PREVIOUS_TOKEN] is not None
        self.position: Position = (-job.priority, row[_RUN_AFTER], row[0])

    def refused(self) -> Outcome | None:
        """The outcome, unrun, of a job whose lost attempts used up its
        retries: it goes to the dead jobs as ``JobLostError``."""
        job = self.job
        if not self.took_over or job.max_retries is None or job.retries <= job.max_retries:
            return None
        lost = JobLostError(
            f"the worker running the job was lost {job.retries} times (its lease "
            "expired each time); no retries left"
        )
        return Outcome("dead", job.retries - 1, describe_error(lost), exc=lost, ran=False)


_PREVIOUS_RETRIES, _TOKEN, _PREVIOUS_TOKEN, _RUN_AFTER = (
    _sql.LEASE_COLUMN_NAMES.index(name)
    for name in ("previous_retries", "lease_token", "previous_token", "run_after")
)


def _ids_and_tokens(leases: list[Lease]) -> tuple[str, str]:
    """The leases' ids and tokens as two array literals (``{1,2,3}``), for
    ``%s::bigint[]``: psycopg dumps a list element by element, which costs
    more per job than the rest of an acknowledgement."""
    ids = ",".join([lease.id for lease in leases])
    tokens = ",".join([str(lease.token) for lease in leases])
    return f"{{{ids}}}", f"{{{tokens}}}"


@dataclass(frozen=True, slots=True)
class Limits:
    """A queue's global limits: ``slots`` jobs at once, ``rate`` = (starts,
    seconds) per window; ``None`` where none applies."""

    slots: int | None
    rate: tuple[int, float] | None


def limits_of(handler: Handler) -> Limits | None:
    """A lease-mode handler's global limits; ``None`` when it has none."""
    if handler.global_concurrency is None and handler.rate_limit is None:
        return None
    return Limits(handler.global_concurrency, handler.rate_window)


@dataclass(frozen=True, slots=True)
class Limited:
    """What a limited claim got: the database's time, the leases, and whether
    a limit (not an empty queue) held it back."""

    now: datetime
    leases: list[Lease]
    held_back: bool


class LeaseStore:
    """Runs lease mode's SQL on pooled connections (the workers' share).

    Args:
        pool: where connections come from.
        log: the backend's log; its ``redact`` scrubs error messages.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        log: BackendLog,
        *,
        per_transaction: _sql.PerTransaction = _sql.DIRECT,
    ) -> None:
        self._pool = pool
        self._log = log
        # Behind a transaction pooler every statement carries its transaction's
        # settings (``_sql.PerTransaction``); otherwise these are the plain ones.
        self._writes = writes = per_transaction.writes
        self._claim_expired = _sql.claim_expired(writes)
        self._complete = _sql.COMPLETE_LEASED + writes
        self._extend = _sql.EXTEND_LEASES + writes
        self._release = _sql.RELEASE_LEASES + writes
        self._lock = _sql.lock_leased(per_transaction.opens)

    async def claim(
        self,
        queue: str,
        count: int,
        lease: float,
        position: Position | None = None,
        *,
        behind: bool = False,
    ) -> list[Lease]:
        """Lease up to ``count`` ready jobs of ``queue``, oldest first; after
        ``position`` in claim order (``behind``: at or before it)."""
        params: dict[str, Any] = {"queue": queue, "n": count, "lease": lease}
        if position is not None:
            params["priority"], params["run_after"], params["id"] = position
        query = _sql.claim_ready(after=position is not None, behind=behind)
        if self._writes:
            query += self._writes
        rows = await self._fetch(f"cannot claim jobs from queue {queue!r}", query, params)
        return [Lease(row) for row in rows]

    async def claim_limited(
        self,
        queue: str,
        count: int,
        lease: float,
        limits: Limits,
        *,
        expired_since: datetime | float | None = None,
    ) -> Limited:
        """``claim`` (or, given ``expired_since``, ``claim_expired``) within the
        queue's global limits (``_limits``)."""
        params: dict[str, Any] = {"queue": queue, "n": count, "lease": lease}
        if limits.slots is not None:
            params["slots"] = limits.slots
        if limits.rate is not None:
            params["starts"], params["per"] = limits.rate
        expired = expired_since is not None
        if expired:
            params["since"] = "-infinity" if isinstance(expired_since, float) else expired_since
            params["error"] = LOST_ERROR
        query = claim_limited(
            expired=expired,
            slots=limits.slots is not None,
            rate=limits.rate is not None,
            leased=_sql.LEASED + self._writes,
        )
        rows = await self._fetch(f"cannot claim jobs from queue {queue!r}", query, params)
        now, free, allowed = rows[0][:LIMITED_COLUMNS]
        leases = [Lease(row[LIMITED_COLUMNS:]) for row in rows if row[LIMITED_COLUMNS] is not None]
        claimed = len(leases)
        held = (free is not None and free <= claimed) or (
            allowed is not None and allowed <= claimed
        )
        return Limited(now, leases, held and claimed < count)

    async def ensure_limits(self, queue: str, limits: Limits) -> None:
        """Create the rows the queue's limits need, where missing."""
        statements = ensure_limits(slots=limits.slots, rate=limits.rate is not None)
        with map_errors(self._log.redact, f"cannot set up the limits of queue {queue!r}"):
            async with self._pool.connection() as conn:
                for statement in statements:
                    await conn.execute(statement, {"queue": queue})

    async def claim_expired(
        self, queue: str, count: int, lease: float, since: datetime | float
    ) -> tuple[datetime, list[Lease]]:
        """Lease again up to ``count`` jobs of ``queue`` whose lease expired
        after ``since`` (``-inf``: ever); returns the database's time of the
        look, for the next one's ``since``."""
        params = {
            "queue": queue,
            "n": count,
            "lease": lease,
            "since": since if not isinstance(since, float) else "-infinity",
            "error": LOST_ERROR,
        }
        doing = f"cannot claim lost jobs of queue {queue!r}"
        rows = await self._fetch(doing, self._claim_expired, params)
        now: datetime = rows[0][0]
        return now, [Lease(row[1:]) for row in rows if row[1] is not None]

    async def complete(self, leases: list[Lease]) -> list[Lease]:
        """Mark leased jobs processed, in one statement; returns those whose
        lease was lost (someone else runs them now), usually none."""
        ids, tokens = _ids_and_tokens(leases)
        rows = await self._fetch("cannot record processed jobs", self._complete, (ids, tokens, ids))
        if len(rows) == len(leases):  # every lease held: no set to build
            return []
        held = {row[0] for row in rows}
        return [lease for lease in leases if int(lease.id) not in held]

    async def extend(self, leases: list[Lease], seconds: float) -> set[str]:
        """The heartbeat: extend leases by ``seconds`` from now; returns the
        ids whose lease held."""
        ids, tokens = _ids_and_tokens(leases)
        params = (seconds, ids, tokens, ids)
        rows = await self._fetch("cannot extend leases", self._extend, params)
        return {str(row[0]) for row in rows}

    async def release(self, leases: list[Lease]) -> set[str]:
        """Give back the leases of jobs cut short (shutdown): due again at
        once, ``retries`` as before the claim. Returns the ids given back."""
        ids = [int(lease.id) for lease in leases]
        tokens = [lease.token for lease in leases]
        retries = [lease.previous_retries for lease in leases]
        lost = [lease.took_over for lease in leases]
        params = (ids, tokens, retries, lost, ids)
        rows = await self._fetch("cannot give back leases", self._release, params)
        return {str(row[0]) for row in rows}

    async def record(self, lease: Lease, outcome: Outcome) -> bool:
        """Record a failure, a snooze or a dead outcome; whether the lease held."""
        outcome = scrubbed(outcome, self._log.redact)
        with map_errors(self._log.redact, f"cannot record job {lease.id}"):
            conn = await self._pool.acquire(worker=True)
            try:
                query = _sql.record_leased(lease.id, lease.token, outcome, conn) + self._writes
                row = await (await conn.execute(query)).fetchone()
            finally:
                await self._pool.release(conn)
        return row is not None

    async def free_slots(self, queue: str, leases: list[Lease]) -> None:
        """Free the global-concurrency slots of jobs whose lease ended."""
        ids, tokens = _ids_and_tokens(leases)
        await self._fetch(f"cannot free slots of queue {queue!r}", FREE_SLOTS, (ids, tokens, queue))

    async def extend_slots(self, queue: str, leases: list[Lease], seconds: float) -> None:
        """The slots' heartbeat: they expire with their jobs' leases."""
        ids, tokens = _ids_and_tokens(leases)
        params = (seconds, ids, tokens, queue)
        await self._fetch(f"cannot extend slots of queue {queue!r}", EXTEND_SLOTS, params)

    async def _fetch(self, doing: str, query: str, params: Any) -> list[tuple[Any, ...]]:
        """Run one statement on a connection of the workers' share; its rows
        (none for a statement without a result)."""
        with map_errors(self._log.redact, doing):
            conn = await self._pool.acquire(worker=True)
            try:
                cur = await conn.execute(query, params)
                return await cur.fetchall() if cur.description else []
            finally:
                await self._pool.release(conn)

    # -- the job's own transaction (current_transaction() in lease mode) --------------

    async def lock(self, conn: AnyioConnection, lease: Lease, seconds: float) -> None:
        """Open the job's transaction on ``conn``: lock its row under the lease
        (extended by ``seconds``).

        Raises:
            LeaseLostError: the lease was lost; nothing is left open.
        """
        query = self._lock.format(lease=repr(float(seconds)), id=int(lease.id), token=lease.token)
        with map_errors(self._log.redact, f"cannot open job {lease.id}'s transaction"):
            cur = await conn.execute(query)
            cur.nextset()
            row = await cur.fetchone()
            if row is None:
                await conn.execute(_sql.ROLLBACK)
        if row is None:
            raise LeaseLostError(f"job {lease.id}'s lease was lost: it may run elsewhere now")

    async def complete_locked(self, conn: AnyioConnection, lease: Lease) -> bool:
        """Mark the job processed in its open transaction on ``conn`` and
        commit; whether the lease held (it does: the row is locked).

        Raises:
            DatabaseError: the transaction could not commit (a deferred
                constraint the handler's writes break, a lost connection);
                nothing was recorded.
        """
        with map_errors(self._log.redact, f"cannot commit job {lease.id}'s transaction"):
            cur = await conn.execute(_sql.complete_locked(lease.id, lease.token))
            cur.nextset()
            cur.nextset()
            row = await cur.fetchone()
        return row is not None

    async def record_locked(self, conn: AnyioConnection, lease: Lease, outcome: Outcome) -> bool:
        """Record a failure, a snooze or a dead outcome in the job's open
        transaction on ``conn`` (the handler's writes roll back), and commit;
        whether the lease held.

        Raises:
            DatabaseError: the transaction is gone (its session ended);
                nothing was recorded.
        """
        outcome = scrubbed(outcome, self._log.redact)
        with map_errors(self._log.redact, f"cannot record job {lease.id}"):
            cur = await conn.execute(_sql.record_locked(lease.id, lease.token, outcome, conn))
            cur.nextset()
            row = await cur.fetchone()
        return row is not None
