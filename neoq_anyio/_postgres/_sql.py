"""Every SQL statement the PostgreSQL backend runs, in one place.

(``schema.sql``, shipped in the wheel, holds the schema itself.)

Statements with parameters use psycopg's ``%s`` placeholders and the
extended protocol (psycopg prepares them after a few uses). The per-job
statements are built once per queue with the queue inlined as a literal and
run with the simple protocol, so ``BEGIN``, the locking ``SELECT`` and the
``SAVEPOINT`` travel in one round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, LiteralString, TypeAlias

from psycopg import sql

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping
    from datetime import datetime

    from psycopg.abc import AdaptContext

    from neoq_anyio._outcome import Outcome

__all__ = [
    "JOB_COLUMNS",
    "JOB_COLUMN_NAMES",
    "FutureJobQuery",
    "JobQuery",
    "PendingJobIDQuery",
]

JOB_COLUMNS: Final = (
    "id, fingerprint, queue, status, deadline, payload, retries, max_retries, "
    "run_after, ran_at, created_at, error, priority"
)
JOB_COLUMN_NAMES: Final = tuple(name.strip() for name in JOB_COLUMNS.split(","))

_READY: Final = "status <> 'processed' AND lease_token IS NULL"
"""Jobs a claim may take (neoq_anyio_jobs_ready_idx's predicate): unprocessed
and not leased. Every query for due jobs says so, to use that index."""

CLAIM_ORDER: Final = "-priority::integer, run_after, id"
"""Claim order: higher priority first, then older ``run_after``, then id; the
key of ``neoq_anyio_jobs_ready_idx``, so claims read the index in order."""

JobQuery: Final[LiteralString] = (
    "SELECT " + JOB_COLUMNS + " FROM neoq_jobs "
    "WHERE queue = %s AND status <> 'processed' AND lease_token IS NULL AND run_after <= now() "
    "ORDER BY -priority::integer, run_after, id "
    "LIMIT 1 FOR UPDATE SKIP LOCKED"
)
"""Takes the next due job of a queue and locks its row for the job's transaction.

Unlike Go neoq's id lookup, workers ask for *the next due job*: a
notification only wakes a worker, so a backlog drains at full concurrency and
processes sharing a database never race for the same row.
"""

PendingJobIDQuery: Final[LiteralString] = (
    "SELECT id FROM neoq_jobs "
    "WHERE queue = %s AND status <> 'processed' AND lease_token IS NULL AND run_after <= now() "
    "LIMIT 1"
)
"""Finds whether a queue has a due job that no notification announced."""

FutureJobQuery: Final[LiteralString] = (
    "SELECT id, queue, extract(epoch FROM run_after - clock_timestamp())::float8 "
    "FROM neoq_jobs "
    "WHERE queue = ANY(%s) AND status IN ('new', 'failed') AND lease_token IS NULL "
    "AND run_after > now() AND run_after <= now() + make_interval(secs => %s) "
    "ORDER BY run_after LIMIT 1000"
)
"""Lists jobs that come due within the future-job window, with seconds until due
(measured on the database's clock, so the process clock's skew does not matter).
The status list lets Go neoq's index on (queue, status, run_after) find them."""

TAKE_COLUMN_NAMES: Final = (*JOB_COLUMN_NAMES, "trace_context")
"""The columns ``take_job`` reads: ``JobQuery``'s, and the job's trace context."""

_TAKE_QUERY: Final = JobQuery.replace(" FROM neoq_jobs ", ", trace_context FROM neoq_jobs ", 1)

SAVEPOINT: Final = "neoq_job"

ROLLBACK: Final = "ROLLBACK"
"""Ends a job transaction that found no job."""


def _insert(*, default_max_retries: bool, notify: bool, traced: bool, prioritized: bool) -> str:
    columns = "queue, fingerprint, payload, run_after, deadline"
    values = "%s, %s, %s::jsonb, coalesce(%s, now()), %s"
    if not default_max_retries:
        columns += ", max_retries"
        values += ", %s"
    if prioritized:
        columns += ", priority"
        values += ", %s"
    if traced:
        columns += ", trace_context"
        values += ", %s::jsonb"
    returning = "id, pg_notify(queue, id::text)" if notify else "id"
    return (
        f"INSERT INTO neoq_jobs ({columns}) VALUES ({values}) "
        f"ON CONFLICT DO NOTHING RETURNING {returning}"
    )


_INSERT_JOB: Final = {
    (default, notify, traced, prioritized): _insert(
        default_max_retries=default, notify=notify, traced=traced, prioritized=prioritized
    )
    for default in (True, False)
    for notify in (True, False)
    for traced in (True, False)
    for prioritized in (False, True)
}


def insert_job(
    *,
    default_max_retries: bool,
    notify: bool = False,
    traced: bool = False,
    prioritized: bool = False,
) -> str:
    """The INSERT for one job; ``ON CONFLICT DO NOTHING`` turns a duplicate into
    an empty result instead of an error that would abort the caller's transaction.

    ``notify`` announces the job explicitly, for sessions whose TimeZone is
    not UTC: there Go neoq's trigger, which compares ``run_after`` with
    ``timezone('utc', created_at)``, misses due jobs east of Greenwich.
    ``traced`` also writes the job's ``trace_context`` (a last ``%s``, JSON):
    only jobs enqueued with tracing on carry one; Go neoq's INSERTs leave the
    column NULL.
    """
    return _INSERT_JOB[default_max_retries, notify, traced, prioritized]


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


class TakeQuery:
    """``BEGIN; <JobQuery>; SAVEPOINT`` for one queue: one round trip to start
    a job in transaction mode.

    The savepoint lets a failed handler's writes roll back while the job's
    row lock, and the failure record, stay in the same transaction. The queue
    is inlined as a literal (quoted once, with the connection's encoding) and
    the statement runs with the simple protocol, hence one round trip.

    Args:
        queue: the queue.
        context: the connection, for quoting.
        settings: ``PerTransaction.opens``, extra columns that configure the
            job's transaction behind a pooler.
    """

    __slots__ = ("_select", "plain")

    def __init__(self, queue: str, context: AdaptContext, settings: str = "") -> None:
        columns = f"{JOB_COLUMNS}, trace_context{settings}"
        literal = sql.Literal(queue).as_string(context)
        # NUL cannot occur in a queue name (check_queue_name), so the markers
        # cannot either.
        self._select = (
            f"SELECT {columns} FROM neoq_jobs WHERE queue = {literal} AND {_READY} "
            f"AND run_after <= now(){_EXTRA} ORDER BY {CLAIM_ORDER} "
            f"LIMIT {_LIMIT} FOR UPDATE SKIP LOCKED"
        )
        self.plain = self.text()

    def text(
        self,
        *,
        skip: Collection[int] = (),
        position: Position | None = None,
        behind: bool = False,
        higher_first: bool = True,
    ) -> str:
        """The statement; ``skip``: ids of jobs not to take (held back after
        their outcome failed to record); ``position``: only jobs after it in
        claim order (``behind``: at or before it), see ``_watermark``. Jobs of
        a higher priority than the position's come first (unless not
        ``higher_first``): they are behind it, but due before everything
        after it."""
        base = ""
        if skip:
            base = f" AND id NOT IN ({', '.join(f'{int(job_id):d}' for job_id in skip)})"
        if position is None:
            select = self._part(base, "1")
        elif behind:
            select = self._part(base + position_condition(position, behind=True), "1")
        elif not higher_first:
            select = self._part(base + position_condition(position, behind=False), "1")
        else:
            higher = self._part(base + f" AND -priority::integer < {int(position[0]):d}", "1")
            after = base + position_condition(position, behind=False)
            ahead = self._part(after, "(1 - (SELECT count(*) FROM higher))")
            select = (
                f"WITH higher AS ({higher}), ahead AS ({ahead}) "
                "SELECT * FROM higher UNION ALL SELECT * FROM ahead"
            )
        return f"BEGIN; {select}; SAVEPOINT {SAVEPOINT}"

    def _part(self, extra: str, limit: str) -> str:
        return self._select.replace(_EXTRA, extra).replace(_LIMIT, limit)


_EXTRA: Final = "\x00extra\x00"
_LIMIT: Final = "\x00limit\x00"

Position: TypeAlias = "tuple[int, datetime, int]"
"""A place in claim order: a job's ``(-priority, run_after, id)``."""


def position_condition(position: Position, *, behind: bool) -> str:
    """`` AND (-priority, run_after, id) > (...)`` (``<=`` when ``behind``), with
    the position inlined: integers and a timestamp in ISO form, none from user
    input as text (``int``, ``isoformat`` of a ``datetime``)."""
    negated, run_after, job_id = position
    op = "<=" if behind else ">"
    return (
        f" AND (-priority::integer, run_after, id) {op} "
        f"({int(negated):d}, '{run_after.isoformat()}'::timestamptz, {int(job_id):d})"
    )


def record_outcome(job_id: str, outcome: Outcome, context: AdaptContext) -> str:
    """The statements that record a run's outcome in the job's transaction, and COMMIT.

    A success first checks the handler's deferred constraints (``SET
    CONSTRAINTS ALL IMMEDIATE``): one it broke fails there, inside the
    transaction, which can still record the failure under the row lock,
    instead of failing the COMMIT, which would end the transaction and free
    the row. A failure first rolls back to the savepoint ``take_job`` set,
    undoing the handler's writes while keeping the row lock. Ids are inlined
    as integers (``int()`` refuses anything else), texts as literals.
    """
    row = int(job_id)
    if outcome.kind == "processed":
        # Released before the UPDATE, the savepoint's subtransaction gets no
        # id of its own when the handler wrote nothing: one transaction id per
        # job, not two.
        return (
            f"SET CONSTRAINTS ALL IMMEDIATE; RELEASE SAVEPOINT {SAVEPOINT}; "
            "UPDATE neoq_jobs SET status = 'processed', ran_at = now(), error = NULL, "
            f"retries = {int(outcome.retries):d} WHERE id = {row:d}; COMMIT"
        )
    failure = _record_failure(outcome, context, target=f"{row:d}", ctes=[])
    return f"ROLLBACK TO SAVEPOINT {SAVEPOINT}; {failure}; COMMIT"


def record_unlocked(
    job_id: str, taken: Mapping[str, Any], outcome: Outcome, context: AdaptContext
) -> str:
    """Record ``outcome`` in a transaction of its own, for a job whose own
    transaction failed (its row lock died with it); the third result holds a
    row if it wrote (``RECORD_UNLOCKED_RESULT``).

    The row is locked anew, waiting at most ``UNLOCKED_LOCK_TIMEOUT`` (the
    dead session's backend may still be letting go of it), and changed only
    if it is still as the worker took it (``taken``: ``status``, ``retries``,
    ``run_after``, ``ran_at``): a job another worker has taken, run or
    recorded since is left alone, and recording twice changes nothing.
    """
    values = {name: sql.Literal(taken[name]).as_string(context) for name in _GUARD_COLUMNS}
    guard = (
        f"job AS (SELECT id FROM neoq_jobs WHERE id = {int(job_id):d} "
        f"AND status::text = {values['status']} "
        f"AND coalesce(retries, 0) = {values['retries']} "
        f"AND run_after IS NOT DISTINCT FROM {values['run_after']}::timestamptz "
        f"AND ran_at IS NOT DISTINCT FROM {values['ran_at']}::timestamptz "
        "FOR UPDATE)"
    )
    if outcome.kind == "processed":
        statement = (
            f"WITH {guard} "
            "UPDATE neoq_jobs SET status = 'processed', ran_at = now(), error = NULL, "
            f"retries = {int(outcome.retries):d} WHERE id = (SELECT id FROM job) RETURNING id"
        )
    else:
        statement = _record_failure(outcome, context, target="SELECT id FROM job", ctes=[guard])
    timeout = math.ceil(UNLOCKED_LOCK_TIMEOUT * 1000)
    return f"BEGIN; SET LOCAL lock_timeout = {timeout:d}; {statement}; COMMIT"


RECORD_UNLOCKED_RESULT: Final = 2
"""Which result of ``record_unlocked`` holds the written row (after BEGIN and SET)."""

UNLOCKED_LOCK_TIMEOUT: Final = 2.0
"""Seconds ``record_unlocked`` waits for the job's row: enough for a dead
session's backend to exit; a live worker elsewhere holding it makes it give up
(SQLSTATE ``LOCK_NOT_AVAILABLE``): the job is that worker's now."""

LOCK_NOT_AVAILABLE: Final = "55P03"

_GUARD_COLUMNS: Final = ("status", "retries", "run_after", "ran_at")


def _record_failure(
    outcome: Outcome, context: AdaptContext, *, target: str, ctes: list[str]
) -> str:
    """One statement recording a failure (``retry``) or a dead job, for the job
    whose id ``target`` (a literal, or a subquery of ``ctes``) gives; it returns
    the job's id.

    A retry normally sets ``status = 'failed'``. If another failed job has
    the same queue and fingerprint, that would violate neoq's unique index
    (one unprocessed job per queue, fingerprint and status), so the job keeps
    its status and its ``retries`` already counts this run, which makes the
    next run count exactly as a failed job's would (``as_run``).

    A snooze is recorded here too (``_record_snooze``): not a failure, but
    what a failure is undone by (the savepoint) and guarded by is the same.
    """
    if outcome.kind == "snooze":
        return _record_snooze(outcome, target=target, ctes=ctes)
    retries = int(outcome.retries)
    message = _text_literal(outcome.error or "", context)
    if outcome.kind == "retry":
        delay = float(outcome.delay)
        with_ = f"WITH {', '.join(ctes)} " if ctes else ""
        return (
            f"{with_}UPDATE neoq_jobs AS j SET "
            "status = CASE WHEN b.blocked THEN j.status ELSE 'failed' END, "
            "lease_token = NULL, lease_expires_at = NULL, "
            f"retries = CASE WHEN b.blocked THEN {retries + 1:d} ELSE {retries:d} END, "
            f"ran_at = now(), error = {message}, "
            f"run_after = clock_timestamp() + make_interval(secs => {delay!r}) "
            "FROM (SELECT EXISTS (SELECT 1 FROM neoq_jobs AS o JOIN neoq_jobs AS k "
            "ON o.queue = k.queue AND o.fingerprint = k.fingerprint "
            f"WHERE k.id = ({target}) AND o.id <> k.id AND o.status = 'failed') AS blocked) AS b "
            f"WHERE j.id = ({target}) RETURNING j.id"
        )
    dead = (
        f"dead AS (DELETE FROM neoq_jobs WHERE id = ({target}) "
        "RETURNING id, queue, fingerprint, payload, max_retries, deadline, priority)"
    )
    return (
        f"WITH {', '.join([*ctes, dead])} "
        "INSERT INTO neoq_dead_jobs "
        "(id, queue, fingerprint, payload, retries, max_retries, error, deadline, priority) "
        f"SELECT id, queue, fingerprint, payload, {retries:d}, max_retries, {message}, "
        "deadline, priority FROM dead RETURNING id"
    )


def _record_snooze(outcome: Outcome, *, target: str, ctes: list[str]) -> str:
    """One statement giving back a snoozed job, due in ``outcome.delay``
    seconds, its ``retries`` as before the run; it returns the job's id.

    Only ``run_after`` (and ``retries``, which a lease-mode claim counted)
    change: the status stays ``new`` or ``failed`` (so neoq's unique index
    cannot object), ``error`` and ``ran_at`` stay those of the last failure,
    if any, and a lease is given back.
    """
    with_ = f"WITH {', '.join(ctes)} " if ctes else ""
    return (
        f"{with_}UPDATE neoq_jobs SET lease_token = NULL, lease_expires_at = NULL, "
        f"retries = {int(outcome.retries):d}, "
        f"run_after = clock_timestamp() + make_interval(secs => {float(outcome.delay)!r}) "
        f"WHERE id = ({target}) RETURNING id"
    )


def _text_literal(text: str, context: AdaptContext) -> str:
    """``text`` as an SQL literal; in a session whose client encoding cannot
    represent it, with the characters it lacks escaped (never an error: an
    error here would leave the job unrecorded)."""
    try:
        return sql.Literal(text).as_string(context)
    except UnicodeEncodeError:
        return sql.Literal(text.encode("ascii", "backslashreplace").decode()).as_string(context)


# -- lease mode (neoq_anyio._postgres._leases) ------------------------------------------

LEASE_COLUMN_NAMES: Final = (
    *JOB_COLUMN_NAMES,
    "trace_context",
    "previous_retries",
    "lease_token",
    "previous_token",
)
"""What a claim returns per job: the job (as the handler sees it: ``retries``
already counts this attempt), its trace context, and what the claim
replaced, to give it back on release."""

_LEASED: Final = ", ".join(
    [f"j.{name}" for name in (*JOB_COLUMN_NAMES, "trace_context")]
    + ["c.retries AS previous_retries", "j.lease_token", "c.token AS previous_token"]
)


LEASED: Final = _LEASED
"""What a claiming UPDATE returns (``LEASE_COLUMN_NAMES``)."""


def claim_ready(*, after: bool = False, behind: bool = False) -> str:
    """Lease up to ``%(n)s`` ready jobs of ``%(queue)s`` for ``%(lease)s`` seconds.

    One statement: the jobs are locked (``SKIP LOCKED``: claimers never wait
    for each other), leased and returned. The fencing token is the claiming
    transaction's id, unique to this claim. The attempt is counted now, as
    ``as_run`` counts it (a failed job's run is a retry), so a job whose
    worker dies has it counted already. ``after``: only jobs after the
    position ``%(priority)s`` (negated), ``%(run_after)s``, ``%(id)s`` in
    claim order, and higher priorities (``behind``: at or before it); see
    ``_watermark``.
    """
    return _CLAIM_READY[after, behind]


def _claim_ready(*, after: bool, behind: bool) -> str:
    def part(extra: str, limit: str) -> str:
        return (
            "SELECT id, ctid, coalesce(retries, 0) AS retries, NULL::bigint AS token "
            f"FROM neoq_jobs WHERE queue = %(queue)s AND {_READY} AND run_after <= now(){extra} "
            f"ORDER BY {CLAIM_ORDER} LIMIT {limit} FOR UPDATE SKIP LOCKED"
        )

    position = "(%(priority)s, %(run_after)s, %(id)s)"
    if not after:
        picked = f"c AS ({part('', '%(n)s')})"
    elif behind:
        behind_it = f" AND (-priority::integer, run_after, id) <= {position}"
        picked = f"c AS ({part(behind_it, '%(n)s')})"
    else:  # higher priorities than the position's first: see TakeQuery.text
        higher = part(" AND -priority::integer < %(priority)s", "%(n)s")
        # Both lock up to n (the statement ends at once, so the surplus is
        # free again at once): a constant LIMIT keeps the planner's estimate
        # small, and the UPDATE on index lookups rather than a table scan.
        ahead = part(f" AND (-priority::integer, run_after, id) > {position}", "%(n)s")
        picked = (
            f"higher AS ({higher}), ahead AS ({ahead}), "
            "c AS (SELECT * FROM higher UNION ALL SELECT * FROM ahead LIMIT %(n)s)"
        )
    return (
        f"WITH {picked} "
        "UPDATE neoq_jobs AS j SET lease_token = txid_current(), "
        "lease_expires_at = now() + make_interval(secs => %(lease)s), "
        "retries = c.retries + (j.status = 'failed')::int "
        f"FROM c WHERE j.ctid = c.ctid RETURNING {_LEASED}"
    )


_CLAIM_READY: Final = {
    (after, behind): _claim_ready(after=after, behind=behind)
    for after in (False, True)
    for behind in (False, True)
}


def claim_expired(settings: str = "") -> str:
    """``CLAIM_EXPIRED`` with ``settings`` (``PerTransaction.writes``)
    returned by the claiming UPDATE, behind a transaction pooler."""
    return (
        "WITH c AS (SELECT id, ctid, coalesce(retries, 0) AS retries, lease_token AS token "
        "FROM neoq_jobs WHERE queue = %(queue)s AND lease_token IS NOT NULL "
        "AND lease_expires_at <= now() AND lease_expires_at > %(since)s "
        "ORDER BY lease_expires_at LIMIT %(n)s FOR UPDATE SKIP LOCKED), "
        "claimed AS (UPDATE neoq_jobs AS j SET lease_token = txid_current(), "
        "lease_expires_at = now() + make_interval(secs => %(lease)s), "
        "retries = c.retries + 1, error = %(error)s "
        f"FROM c WHERE j.ctid = c.ctid RETURNING {_LEASED}{settings}) "
        "SELECT now(), claimed.* FROM (SELECT) AS one LEFT JOIN claimed ON true"
    )


CLAIM_EXPIRED: Final = claim_expired()
"""Lease again up to ``%(n)s`` jobs of ``%(queue)s`` whose lease expired after
``%(since)s`` (their worker was lost); the first column of every row is the
database's ``now()`` (one row of NULLs when none expired). The lost attempt
counts as a failed run (``%(error)s`` says so): ``retries`` grows by one."""

COMPLETE_LEASED: Final = (
    "UPDATE neoq_jobs AS j SET status = 'processed', ran_at = now(), error = NULL, "
    "lease_token = NULL, lease_expires_at = NULL "
    "FROM unnest(%s::bigint[], %s::bigint[]) AS d(id, token) "
    "WHERE j.id = d.id AND j.lease_token = d.token AND j.id = ANY(%s::bigint[]) RETURNING j.id"
)
"""Mark leased jobs processed (ids, tokens, ids again); returns the ids whose
lease held. The ids twice: as an index condition too, so the plan never scans
the table (it would, joining on the unnest alone, on a table without
statistics)."""

EXTEND_LEASES: Final = (
    "UPDATE neoq_jobs AS j SET lease_expires_at = now() + make_interval(secs => %s) "
    "FROM unnest(%s::bigint[], %s::bigint[]) AS d(id, token) "
    "WHERE j.id = d.id AND j.lease_token = d.token AND j.id = ANY(%s::bigint[]) RETURNING j.id"
)
"""The heartbeat: extend leases (seconds, ids, tokens); returns the ids whose lease held."""

RELEASE_LEASES: Final = (
    "UPDATE neoq_jobs AS j SET "
    "lease_token = CASE WHEN d.lost THEN j.lease_token END, "
    "lease_expires_at = CASE WHEN d.lost THEN now() END, "
    "retries = d.retries "
    "FROM unnest(%s::bigint[], %s::bigint[], %s::int[], %s::bool[]) AS d(id, token, retries, lost) "
    "WHERE j.id = d.id AND j.lease_token = d.token AND j.id = ANY(%s::bigint[]) "
    "RETURNING j.id, pg_notify(j.queue, j.id::text)"
)
"""Give back leases of jobs cut short (ids, tokens, retries before the claim,
whether the claim had taken over a lost lease): due again at once, as before
the claim. A job whose lease was lost before stays a lost lease (expired now,
under a token nobody holds), so its next claim still counts that attempt."""

LOCK_LEASED: Final = (
    "BEGIN; UPDATE neoq_jobs SET lease_expires_at = now() + make_interval(secs => {lease}) "
    "WHERE id = {id} AND lease_token = {token} RETURNING id; SAVEPOINT " + SAVEPOINT
)
"""Open a leased job's transaction: lock its row if the lease still holds
(no row back: lost), and extend the lease while at it. The savepoint lets a
failure be recorded in the same transaction, under the row lock, once the
handler's writes are rolled back (``record_locked``)."""


def lock_leased(settings: str = "") -> str:
    """``LOCK_LEASED`` with ``settings`` (``PerTransaction.opens``) returned by
    its UPDATE, behind a transaction pooler."""
    return LOCK_LEASED.replace(" RETURNING id", f" RETURNING id{settings}", 1)


def complete_locked(job_id: str, token: int) -> str:
    """Mark a leased job processed in its own transaction (the handler's
    writes commit with it), and COMMIT; deferred constraints are checked
    first, as in ``record_outcome``. The third result holds the row if the
    lease held."""
    return (
        f"SET CONSTRAINTS ALL IMMEDIATE; RELEASE SAVEPOINT {SAVEPOINT}; "
        "UPDATE neoq_jobs SET status = 'processed', ran_at = now(), error = NULL, "
        f"lease_token = NULL, lease_expires_at = NULL WHERE id = {int(job_id):d} "
        f"AND lease_token = {int(token):d} RETURNING id; COMMIT"
    )


def record_locked(job_id: str, token: int, outcome: Outcome, context: AdaptContext) -> str:
    """Record a failed, snoozed or dead outcome in the leased job's open
    transaction, and COMMIT: the handler's writes roll back to the savepoint ``LOCK_LEASED``
    set, the row stays locked, so no one can claim the job in between. The
    second result holds the row if the lease held."""
    statement = record_leased(job_id, token, outcome, context)
    return f"ROLLBACK TO SAVEPOINT {SAVEPOINT}; {statement}; COMMIT"


def record_leased(job_id: str, token: int, outcome: Outcome, context: AdaptContext) -> str:
    """Record a failed (``retry``), ``snooze`` or ``dead`` outcome of a leased
    job, in autocommit; changes nothing unless the lease still holds. Returns the
    job's id when it wrote."""
    guard = (
        f"job AS (SELECT id FROM neoq_jobs WHERE id = {int(job_id):d} "
        f"AND lease_token = {int(token):d} FOR UPDATE)"
    )
    return _record_failure(outcome, context, target="SELECT id FROM job", ctes=[guard])


CLAIM_TICK: Final = (
    "WITH claim AS ("
    " INSERT INTO neoq_anyio_cron_ticks (queue, tick) VALUES (%(queue)s, %(tick)s)"
    " ON CONFLICT DO NOTHING RETURNING queue"
    "), pruned AS ("
    " DELETE FROM neoq_anyio_cron_ticks"
    " WHERE queue = %(queue)s AND tick < %(tick)s::timestamptz - interval '1 day'"
    ") "
    "INSERT INTO neoq_jobs (queue, fingerprint, payload) "
    "SELECT queue, %(fingerprint)s, %(payload)s::jsonb FROM claim "
    "ON CONFLICT DO NOTHING RETURNING id"
)
"""Claim a tick and enqueue its job in one statement; no row back: already claimed."""

CLAIM_TICK_ANNOUNCED: Final = CLAIM_TICK + ", pg_notify(queue, id::text)"
"""``CLAIM_TICK`` announcing the job itself, for a session whose TimeZone is not
known to be UTC (behind a transaction pooler), where Go neoq's trigger may miss it."""


LENT_SESSION: Final = b"SET synchronous_commit TO DEFAULT"
"""A connection lent by ``connection()`` runs the caller's transactions, which
``synchronous_commit=False`` is not meant for: they get the server's setting
(the pool's reset on return turns it off again)."""

SESSION_SETUP: Final = "SET TimeZone = 'UTC'"
"""Every pooled session works in UTC: timestamps come back in UTC, and Go
neoq's trigger compares ``run_after`` with ``timezone('utc', created_at)``,
which is only right when the session's zone is UTC."""


def idle_timeout_ms(transaction_timeout: float) -> int:
    """``idle_in_transaction_session_timeout`` for a ``transaction_timeout``, in ms.

    A margin above it (10 %, at least 1 s; 0 stays 0, no bound): a handler
    may run up to ``job_timeout`` = ``transaction_timeout`` without a query,
    and its transaction must still be alive to record the timeout then.
    """
    if transaction_timeout <= 0:
        return 0
    return math.ceil((transaction_timeout + max(1.0, transaction_timeout / 10)) * 1000)


def session_settings(*, synchronous_commit: bool, transaction_timeout: float) -> bytes:
    """What every pooled session runs once: UTC, the idle-in-transaction bound
    (``idle_timeout_ms``), and (unless asked to keep it)
    ``synchronous_commit = off``, as Go neoq does."""
    statements = [
        SESSION_SETUP,
        f"SET idle_in_transaction_session_timeout = {idle_timeout_ms(transaction_timeout):d}",
    ]
    if not synchronous_commit:
        statements.append("SET synchronous_commit = off")
    return "; ".join(statements).encode()


@dataclass(frozen=True, slots=True)
class PerTransaction:
    """What ``session_settings`` sets once per session, set per transaction
    instead, for sessions behind a transaction pooler (PgBouncer's
    ``pool_mode = transaction``), where each transaction may run in another
    server session and a session setting would leak into other clients'.

    Each is a suffix of ``set_config(..., true)`` calls to append to the
    column list of the statement that locks or writes the rows (a
    ``RETURNING`` list, or the job-taking ``SELECT``'s): evaluated as it
    does, it configures that statement's transaction, with no statement or
    round trip of its own. ``true`` makes them last until the transaction
    ends, commit included, so ``synchronous_commit`` applies to the commit.
    Row readers ignore columns past those they know. Both are empty for a
    direct connection or session pooling, where ``session_settings`` holds.

    Attributes:
        pooled: whether the sessions are behind a transaction pooler.
        writes: for a statement that commits alone: ``synchronous_commit``
            (unless it is kept).
        opens: for the statement that opens a job's transaction: ``writes``
            and the idle-in-transaction bound (``idle_timeout_ms``).
    """

    pooled: bool = False
    writes: str = ""
    opens: str = ""


DIRECT: Final = PerTransaction()
"""No per-transaction settings: a direct connection, or session pooling."""


def per_transaction(*, synchronous_commit: bool, transaction_timeout: float) -> PerTransaction:
    """``session_settings`` as a ``PerTransaction``, for a transaction pooler.

    No TimeZone: nothing the library runs depends on it except Go neoq's
    trigger, so pooled sessions announce due jobs explicitly instead
    (``insert_job(notify=True)``, ``CLAIM_TICK_ANNOUNCED``).
    """
    writes = "" if synchronous_commit else ", set_config('synchronous_commit', 'off', true)"
    idle = idle_timeout_ms(transaction_timeout)
    opens = f"{writes}, set_config('idle_in_transaction_session_timeout', '{idle:d}', true)"
    return PerTransaction(pooled=True, writes=writes, opens=opens)


LISTEN: Final = sql.SQL("LISTEN {}")
"""Format with ``sql.Identifier(channel)``."""

PING: Final = "SELECT 1"
"""The listener's liveness check on an otherwise silent connection."""


# -- database and schema setup ------------------------------------------------------

DATABASE_EXISTS: Final = "SELECT 1 FROM pg_database WHERE datname = %s"

CREATE_DATABASE: Final = sql.SQL("CREATE DATABASE {}")
"""Format with ``sql.Identifier(name)``."""

CREATE_SCHEMA: Final = sql.SQL("CREATE SCHEMA IF NOT EXISTS {}")
"""Format with ``sql.Identifier(name)``."""

SEARCH_PATH: Final = "SELECT current_schema(), current_setting('search_path'), current_user"
"""The schema the session creates tables in (NULL: none yet), where it looks, and
the role ``$user`` stands for."""

MIGRATIONS_TABLE_EXISTS: Final = "SELECT to_regclass('neoq_anyio_migrations') IS NOT NULL"
MIGRATED: Final = "SELECT 1 FROM neoq_anyio_migrations WHERE version = %s"
RECORD_MIGRATION: Final = "INSERT INTO neoq_anyio_migrations (version) VALUES (%s)"
MIGRATION_LOCK: Final = "SELECT pg_advisory_xact_lock(%s)"
MIGRATION_SETUP: Final = "SET LOCAL TimeZone = 'UTC'"
"""``SESSION_SETUP`` for the migration's transaction alone (behind a transaction pooler)."""


# -- for neoq_anyio.testing ----------------------------------------------------------

COUNT_DUE: Final = (
    "SELECT count(*) FROM neoq_jobs WHERE queue = ANY(%s) "
    "AND status <> 'processed' AND (run_after <= now() OR lease_token IS NOT NULL)"
)
"""Jobs due or leased (running, or completed and not yet acknowledged)."""

FAST_FORWARD: Final = (
    "UPDATE neoq_jobs SET run_after = run_after - make_interval(secs => %s) "
    "WHERE status <> 'processed' AND lease_token IS NULL AND run_after > now()"
)

# The dead jobs table has neither run_after nor ran_at, and its status column
# says nothing (Go neoq writes 'failed'): a dead job reads as 'dead'.
_DEAD_COLUMNS: Final = (
    "id, fingerprint, queue, 'dead'::text AS status, deadline, payload, retries, "
    "max_retries, NULL::timestamptz AS run_after, NULL::timestamptz AS ran_at, "
    "created_at, error, coalesce(priority, 0)::smallint AS priority"
)
# The live jobs' columns, typed as the dead ones', for a UNION. A leased job
# reads as running; the table keeps its status (new or failed).
_LIVE_COLUMNS: Final = JOB_COLUMNS.replace(
    "status", "CASE WHEN lease_token IS NULL THEN status::text ELSE 'running' END AS status"
)


def select_jobs(*, dead: bool, queue: bool) -> bytes:
    """Every job (or dead job), oldest first; ``queue``: filtered by a ``%s`` queue."""
    table, columns = ("neoq_dead_jobs", _DEAD_COLUMNS) if dead else ("neoq_jobs", _LIVE_COLUMNS)
    where = " WHERE queue = %s" if queue else ""
    return f"SELECT {columns} FROM {table}{where} ORDER BY id".encode()


# -- managing jobs (neoq_anyio._postgres._admin) ---------------------------------------

GET_JOB: Final = (
    f"SELECT {_LIVE_COLUMNS} FROM neoq_jobs WHERE id = %(id)s "
    f"UNION ALL SELECT {_DEAD_COLUMNS} FROM neoq_dead_jobs WHERE id = %(id)s LIMIT 1"
).encode()


# A leased job reads as running (see _LIVE_COLUMNS).
_STATUS_IS: Final = {
    "running": "lease_token IS NOT NULL",
    "new": "status = 'new' AND lease_token IS NULL",
    "failed": "status = 'failed' AND lease_token IS NULL",
    "processed": "status = 'processed'",
}


def list_jobs(*, queue: bool, status: str | None, before: bool) -> bytes:
    """Jobs newest first, live and dead; ``%(queue)s``, ``%(before)s`` and
    ``%(limit)s`` are parameters. ``status`` picks the table(s) and a filter
    (a checked literal: one of the five statuses)."""
    conditions = []
    if queue:
        conditions.append("queue = %(queue)s")
    if before:
        conditions.append("id < %(before)s")
    parts = []
    if status != "dead":
        live = conditions + ([_STATUS_IS[status]] if status else [])
        where = f" WHERE {' AND '.join(live)}" if live else ""
        parts.append(
            f"(SELECT {_LIVE_COLUMNS} FROM neoq_jobs{where} ORDER BY id DESC LIMIT %(limit)s)"
        )
    if status in (None, "dead"):
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        parts.append(
            f"(SELECT {_DEAD_COLUMNS} FROM neoq_dead_jobs{where} ORDER BY id DESC LIMIT %(limit)s)"
        )
    union = " UNION ALL ".join(parts)
    return f"SELECT * FROM ({union}) AS jobs ORDER BY id DESC LIMIT %(limit)s".encode()


# A job being run now holds its row lock (transaction mode) or a lease: these
# statements leave it alone instead of waiting for the job to end.
_UNLOCKED_JOB: Final = (
    "SELECT id FROM neoq_jobs WHERE id = %(id)s AND lease_token IS NULL FOR UPDATE SKIP LOCKED"
)

_RETURNING_JOB: Final = ", ".join(
    f"neoq_jobs.{name}::text" if name == "status" else f"neoq_jobs.{name}"
    for name in JOB_COLUMN_NAMES
)

RETRY_LIVE_JOB: Final = (
    f"WITH j AS ({_UNLOCKED_JOB}) "
    "UPDATE neoq_jobs SET run_after = now(), "
    "status = CASE WHEN neoq_jobs.status = 'processed' THEN 'new' ELSE neoq_jobs.status END "
    f"FROM j WHERE neoq_jobs.id = j.id RETURNING {_RETURNING_JOB}, "
    "pg_notify(neoq_jobs.queue, neoq_jobs.id::text)"
).encode()
"""Make a live job due now (a processed one new again), and announce it, in
any session time zone."""

RETRY_DEAD_JOB: Final = (
    "WITH dead AS (DELETE FROM neoq_dead_jobs WHERE id = %(id)s RETURNING *) "
    "INSERT INTO neoq_jobs (id, queue, fingerprint, payload, retries, max_retries, deadline, "
    "error, status, run_after, priority) "
    "SELECT id, queue, fingerprint, payload, coalesce(retries, 0), max_retries, deadline, "
    "error, 'new', now(), coalesce(priority, 0) FROM dead "
    f"ON CONFLICT DO NOTHING RETURNING {_LIVE_COLUMNS}, "
    "pg_notify(queue, id::text)"
).encode()
"""Move a dead job back to its queue, due now, keeping its id. Run it in a
transaction: when a twin blocks the INSERT, the DELETE must roll back."""

DEAD_JOB_EXISTS: Final = b"SELECT 1 FROM neoq_dead_jobs WHERE id = %(id)s"
LIVE_JOB: Final = f"SELECT {_LIVE_COLUMNS} FROM neoq_jobs WHERE id = %(id)s".encode()

CANCEL_JOB: Final = (
    # A leased job is cancelled too: its worker finds the lease gone at its
    # next heartbeat and cancels the handler.
    b"WITH j AS (SELECT id FROM neoq_jobs WHERE id = %(id)s FOR UPDATE SKIP LOCKED), "
    b"gone AS (DELETE FROM neoq_jobs USING j WHERE neoq_jobs.id = j.id "
    b"AND neoq_jobs.status <> 'processed' RETURNING neoq_jobs.*) "
    b"INSERT INTO neoq_dead_jobs (id, queue, fingerprint, payload, retries, max_retries, error, "
    b"deadline, priority) SELECT id, queue, fingerprint, payload, retries, max_retries, "
    b"'cancelled', deadline, priority FROM gone RETURNING id"
)

DELETE_JOB: Final = (
    f"WITH j AS ({_UNLOCKED_JOB}), "
    "live AS (DELETE FROM neoq_jobs USING j WHERE neoq_jobs.id = j.id RETURNING 1), "
    "dead AS (DELETE FROM neoq_dead_jobs WHERE id = %(id)s RETURNING 1) "
    "SELECT (SELECT count(*) FROM live) + (SELECT count(*) FROM dead)"
).encode()

QUEUE_STATS: Final = (
    b"SELECT queue, "
    b"count(*) FILTER (WHERE status <> 'processed' AND lease_token IS NULL "
    b"AND run_after <= now()), "
    b"count(*) FILTER (WHERE status = 'new' AND lease_token IS NULL AND run_after > now()), "
    b"count(*) FILTER (WHERE lease_token IS NOT NULL), "
    b"count(*) FILTER (WHERE status = 'failed' AND lease_token IS NULL AND run_after > now()), "
    b"count(*) FILTER (WHERE status = 'processed'), "
    b"extract(epoch FROM now() - min(run_after) FILTER ("
    b"WHERE status <> 'processed' AND lease_token IS NULL AND run_after <= now()))::float8 "
    b"FROM neoq_jobs GROUP BY queue"
)

DEAD_BY_QUEUE: Final = b"SELECT queue, count(*) FROM neoq_dead_jobs GROUP BY queue"


# -- retention (neoq_anyio._postgres._admin) -------------------------------------------

PRUNE_LOCK: Final = b"SELECT pg_try_advisory_xact_lock(%s)"
"""Taken in each pruning transaction: one process prunes at a time."""

PRUNE_PROCESSED: Final = (
    b"DELETE FROM neoq_jobs WHERE id IN (SELECT id FROM neoq_jobs "
    b"WHERE status = 'processed' AND ran_at < now() - make_interval(secs => %(age)s) "
    b"ORDER BY id LIMIT %(batch)s FOR UPDATE SKIP LOCKED)"
)
"""One batch of processed jobs older than ``age`` seconds, oldest ids first
(the id index reaches them without a sort)."""

PRUNE_DEAD: Final = (
    b"DELETE FROM neoq_dead_jobs WHERE id IN (SELECT id FROM neoq_dead_jobs "
    b"WHERE created_at < now() - make_interval(secs => %(age)s) "
    b"ORDER BY created_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED)"
)
"""One batch of jobs dead for longer than ``age`` seconds."""


# -- paused queues (neoq_anyio._postgres._pauses) ------------------------------------

QUEUES_CHANNEL: Final = "neoq_anyio_queues_v1"
"""Where a pause or resume is announced (payload: the queue), so that every
listening process re-reads the paused queues at once."""

PAUSE_QUEUE: Final = (
    b"WITH changed AS ("
    b"INSERT INTO neoq_anyio_queues AS q (queue, paused, changed_at) "
    b"VALUES (%(queue)s, true, now()) "
    b"ON CONFLICT (queue) DO UPDATE SET paused = true, changed_at = now() WHERE NOT q.paused "
    b"RETURNING queue) "
    b"SELECT pg_notify('" + QUEUES_CHANNEL.encode() + b"', queue) FROM changed"
)
"""Mark a queue paused and announce it; nothing (no row) if it was paused already."""

RESUME_QUEUE: Final = (
    b"WITH changed AS ("
    b"UPDATE neoq_anyio_queues SET paused = false, changed_at = now() "
    b"WHERE queue = %(queue)s AND paused RETURNING queue) "
    b"SELECT pg_notify('" + QUEUES_CHANNEL.encode() + b"', queue) FROM changed"
)
"""Mark a queue running again and announce it; nothing if it was not paused."""

PAUSED_QUEUES: Final = b"SELECT queue FROM neoq_anyio_queues WHERE paused"
"""The paused queues: what every process re-reads every ``job_check_interval``."""
