"""Global limits of lease-mode queues: concurrency across processes, and job
starts per window, enforced inside the claim itself.

Global concurrency: a queue has ``N`` slot rows. A claim locks free slots
(``SKIP LOCKED``, so claimers never wait for each other) and leases at most
as many jobs, writing each job's id, lease token and lease expiry into a
slot. Heartbeats extend the slots with the leases; the statements that end
a job's lease (completed, failed, released at shutdown) free its slot; a
lost worker's slot expires with its lease. No leader process.

Rate limit: a queue has one row counting the job starts of the current fixed
window (windows aligned on the database's clock). The claim locks it (rate
limited claimers queue on it), takes at most what is left of the window,
and counts what it took. A fixed window lets up to ``2n`` starts through
around a window's edge (the end of one, the start of the next); within any
one window, never more than ``n``.

Limited claims say how many slots and starts were left, so a claimer held
back by a limit (not by an empty queue) knows to try again soon: at the next
window, or after a short pause for slots.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EXTEND_SLOTS", "FREE_SLOTS", "LIMITED_COLUMNS", "claim_limited", "ensure_limits"]

LIMITED_COLUMNS: Final = 3
"""Columns before the job's in a limited claim's rows: the database's now(),
the slots left before the claim, the starts left in the window (NULL where
the limit does not apply)."""


def claim_limited(*, expired: bool, slots: bool, rate: bool, leased: str) -> str:
    """Lease jobs of ``%(queue)s`` within its global limits, in one statement.

    ``expired``: jobs whose lease expired after ``%(since)s`` (see
    ``_sql.CLAIM_EXPIRED``), else ready jobs in claim order, from the head
    (no watermark: a claim a limit held back takes fewer jobs than are due,
    which a watermark would have to tell apart). ``slots``: at most
    ``%(slots)s`` running at once; ``rate``:
    at most ``%(starts)s`` starts per window of ``%(per)s`` seconds.
    ``leased``: the columns the claiming UPDATE returns (``_sql._LEASED``).
    Always one row at least: the first ``LIMITED_COLUMNS`` columns say what
    the limits left; the job's columns are NULL when none was claimed.
    """
    ctes = []
    limit = "%(n)s"
    if rate:
        ctes.append("w AS (SELECT floor(extract(epoch FROM now()) / %(per)s)::bigint AS no)")
        ctes.append(
            "r AS (SELECT window_no, started FROM neoq_anyio_rates "
            "WHERE queue = %(queue)s FOR UPDATE)"
        )
        ctes.append(
            "allowed AS (SELECT CASE WHEN r.window_no = w.no "
            "THEN greatest(%(starts)s - r.started, 0) ELSE %(starts)s END AS n FROM r, w)"
        )
        limit = f"least({limit}, (SELECT n FROM allowed))"
    if slots:
        # Only the slot's own columns decide: a slot another claim took
        # meanwhile is rechecked in its new version and skipped.
        ctes.append(
            "free AS (SELECT slot FROM neoq_anyio_slots "
            "WHERE queue = %(queue)s AND slot < %(slots)s "
            "AND (expires_at IS NULL OR expires_at <= now()) "
            "ORDER BY slot LIMIT %(n)s FOR UPDATE SKIP LOCKED)"
        )
        limit = f"least({limit}, (SELECT count(*) FROM free))"
    if expired:
        ctes.append(
            "c AS (SELECT id, ctid, coalesce(retries, 0) AS retries, lease_token AS token "
            "FROM neoq_jobs WHERE queue = %(queue)s AND lease_token IS NOT NULL "
            "AND lease_expires_at <= now() AND lease_expires_at > %(since)s "
            f"ORDER BY lease_expires_at LIMIT {limit} FOR UPDATE SKIP LOCKED)"
        )
        retries = "c.retries + 1, error = %(error)s"
    else:
        ctes.append(
            "c AS (SELECT id, ctid, coalesce(retries, 0) AS retries, NULL::bigint AS token "
            "FROM neoq_jobs WHERE queue = %(queue)s AND status <> 'processed' "
            "AND lease_token IS NULL AND run_after <= now() "
            f"ORDER BY -priority::integer, run_after, id LIMIT {limit} FOR UPDATE SKIP LOCKED)"
        )
        retries = "c.retries + (j.status = 'failed')::int"
    ctes.append(
        "claimed AS (UPDATE neoq_jobs AS j SET lease_token = txid_current(), "
        "lease_expires_at = now() + make_interval(secs => %(lease)s), "
        f"retries = {retries} FROM c WHERE j.ctid = c.ctid RETURNING {leased})"
    )
    if slots:
        ctes.append("cn AS (SELECT id, row_number() OVER (ORDER BY id) AS rn FROM c)")
        ctes.append("fn AS (SELECT slot, row_number() OVER (ORDER BY slot) AS rn FROM free)")
        ctes.append(
            "taken AS (UPDATE neoq_anyio_slots AS s SET job_id = cn.id, "
            "lease_token = txid_current(), "
            "expires_at = now() + make_interval(secs => %(lease)s) "
            "FROM fn JOIN cn USING (rn) WHERE s.queue = %(queue)s AND s.slot = fn.slot)"
        )
    if rate:
        ctes.append(
            "counted AS (UPDATE neoq_anyio_rates SET window_no = (SELECT no FROM w), "
            "started = CASE WHEN window_no = (SELECT no FROM w) THEN started ELSE 0 END "
            "+ (SELECT count(*) FROM c) WHERE queue = %(queue)s)"
        )
    free = "(SELECT count(*) FROM free)" if slots else "NULL::bigint"
    allowed = "(SELECT n FROM allowed)" if rate else "NULL::bigint"
    return (
        f"WITH {', '.join(ctes)} SELECT now(), {free}, {allowed}, claimed.* "
        "FROM (SELECT) AS one LEFT JOIN claimed ON true"
    )


def ensure_limits(*, slots: int | None, rate: bool) -> list[str]:
    """The statements that create the rows a queue's limits need
    (``%(queue)s``), where missing."""
    statements = []
    if slots is not None:
        statements.append(
            "INSERT INTO neoq_anyio_slots (queue, slot) "
            f"SELECT %(queue)s, g FROM generate_series(0, {int(slots) - 1:d}) AS g "
            "ON CONFLICT DO NOTHING"
        )
    if rate:
        statements.append(
            "INSERT INTO neoq_anyio_rates (queue) VALUES (%(queue)s) ON CONFLICT DO NOTHING"
        )
    return statements


FREE_SLOTS: Final = (
    "UPDATE neoq_anyio_slots AS s SET expires_at = NULL "
    "FROM unnest(%s::bigint[], %s::bigint[]) AS d(id, token) "
    "WHERE s.queue = %s AND s.job_id = d.id AND s.lease_token = d.token"
)
"""Free the slots of jobs whose lease ended (ids, tokens, queue)."""

EXTEND_SLOTS: Final = (
    "UPDATE neoq_anyio_slots AS s SET expires_at = now() + make_interval(secs => %s) "
    "FROM unnest(%s::bigint[], %s::bigint[]) AS d(id, token) "
    "WHERE s.queue = %s AND s.job_id = d.id AND s.lease_token = d.token"
)
"""The heartbeat of slots (seconds, ids, tokens, queue): they follow the leases."""
