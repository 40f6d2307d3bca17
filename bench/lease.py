"""Lease mode beside raw-psycopg floors: throughput, many sleeping jobs, latency.

Run: ``python bench/lease.py`` (embedded PostgreSQL) or
``python bench/lease.py --dsn postgresql://...``; ``--quick --rounds 1`` for
a smoke run; ``--sync-commit on|off|both`` (default both) for the
throughput rows.

Scenarios, each in a fresh schema, on asyncio and trio:

- ``Handler(q, noop, concurrency=50, execution="lease")`` processing 10,000
  due no-op jobs, beside a floor that runs the same claim statements for 100
  jobs at a time on one connection (after a watermark, as the backend does)
  and acknowledges completed jobs in batches on another (the statements are
  copied below from ``neoq_anyio/_postgres/_sql.py``). Timed until the
  database has every job processed. Target: >= 50 % of the floor.
- 10,000 jobs that each ``await anyio.sleep(1)``, concurrency 1,000, on a
  pool of 4 connections (``pool_max_conns=4``): wall time from ``start``
  until all are processed. Target: <= 15 s (``--quick``: 2,000 jobs, <= 3 s).
- Enqueue-to-start latency with idle lease-mode workers, p50/p90/p99,
  beside a floor that LISTENs and runs the claim statement on each
  notification. Target: p50 < 2 ms.

Synchronous commit: the backend's default (``synchronous_commit=False``)
sets it off per session; "on" keeps the server's setting (on). Each floor
uses the setting of the row it sits beside.

Batched enqueue is in ``enqueue_many.py``, transaction mode in ``bench.py``,
backlogs in ``backlog.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from common import (
    INSERT_JOB,
    LOOPS,
    Row,
    bench_latency_ours,
    describe_server,
    ensure_lease_columns,
    floor_connection,
    fresh_schema,
    insert_jobs,
    paired,
    payload_params,
    percentile,
    print_table,
    servers,
    sync_modes,
    with_pool,
)

from neoq_anyio import Handler, Job, open_backend

if TYPE_CHECKING:
    from collections.abc import Callable

# -- the floor's SQL -------------------------------------------------------------------
# The lease-mode statements of neoq_anyio/_postgres/_sql.py (claim_ready, COMPLETE_LEASED);
# keep them in step with it.

JOB_COLUMNS = (
    "id, fingerprint, queue, status, deadline, payload, retries, max_retries, "
    "run_after, ran_at, created_at, error, priority"
)
LEASED = ", ".join(
    [f"j.{name.strip()}" for name in (*JOB_COLUMNS.split(","), "trace_context")]
    + ["c.retries AS previous_retries", "j.lease_token", "c.token AS previous_token"]
)
RUN_AFTER_COLUMN = 8  # of a claimed row
PRIORITY_COLUMN = 12
TOKEN_COLUMN = 15
CLAIM_ORDER = "-priority::integer, run_after, id"  # neoq_anyio_jobs_ready_idx's key
POSITION = "(%(priority)s, %(run_after)s, %(id)s)"

Position = tuple[int, datetime, int]  # (-priority, run_after, id): the watermark


def _ready(extra: str = "") -> str:
    return (
        "SELECT id, ctid, coalesce(retries, 0) AS retries, NULL::bigint AS token "
        "FROM neoq_jobs WHERE queue = %(queue)s AND status <> 'processed' "
        f"AND lease_token IS NULL AND run_after <= now(){extra} "
        f"ORDER BY {CLAIM_ORDER} LIMIT %(n)s FOR UPDATE SKIP LOCKED"
    )


def _claim(picked: str) -> str:
    return (
        f"WITH {picked} UPDATE neoq_jobs AS j SET lease_token = txid_current(), "
        "lease_expires_at = now() + make_interval(secs => %(lease)s), "
        "retries = c.retries + (j.status = 'failed')::int "
        f"FROM c WHERE j.ctid = c.ctid RETURNING {LEASED}"
    )


CLAIM = _claim(f"c AS ({_ready()})")
"""Lease up to n ready jobs, from the head of the queue (no watermark yet)."""
CLAIM_AFTER = _claim(
    f"higher AS ({_ready(' AND -priority::integer < %(priority)s')}), "
    f"ahead AS ({_ready(f' AND (-priority::integer, run_after, id) > {POSITION}')}), "
    "c AS (SELECT * FROM higher UNION ALL SELECT * FROM ahead LIMIT %(n)s)"
)
"""... after the watermark, or of a higher priority than its job's."""
CLAIM_BEHIND = _claim(f"c AS ({_ready(f' AND (-priority::integer, run_after, id) <= {POSITION}')})")
"""... at or before the watermark: when too few were ahead of it."""
COMPLETE = (
    "UPDATE neoq_jobs AS j SET status = 'processed', ran_at = now(), error = NULL, "
    "lease_token = NULL, lease_expires_at = NULL "
    "FROM unnest(%s::bigint[], %s::bigint[]) AS d(id, token) "
    "WHERE j.id = d.id AND j.lease_token = d.token AND j.id = ANY(%s::bigint[]) RETURNING j.id"
)
"""Sent with array literals (``{1,2,3}``: ids, tokens, ids), as the backend does."""


def array_literals(done: list[tuple[int, int]]) -> tuple[str, str, str]:
    """COMPLETE's parameters: ids, tokens and ids again, as array literals."""
    ids = ",".join(str(job_id) for job_id, _ in done)
    tokens = ",".join(str(token) for _, token in done)
    return f"{{{ids}}}", f"{{{tokens}}}", f"{{{ids}}}"


async def floor_claim(
    conn: psycopg.AsyncConnection[Any],
    queue: str,
    n: int,
    position: Position | None,
    *,
    started: Callable[[], object] = lambda: None,
) -> tuple[list[tuple[Any, ...]], Position | None]:
    """Claim up to ``n`` jobs as the backend's claimer does: after the watermark,
    then behind it if too few were ahead; the rows and the new watermark.
    ``started()`` is called once the first statement's jobs are in hand."""
    params: dict[str, Any] = {"queue": queue, "n": n, "lease": LEASE_SECONDS}
    if position is None:
        rows = await (await conn.execute(CLAIM, params)).fetchall()
        started()
    else:
        params["priority"], params["run_after"], params["id"] = position
        rows = await (await conn.execute(CLAIM_AFTER, params)).fetchall()
        started()
        if len(rows) < n:
            params["n"] = n - len(rows)
            rows += await (await conn.execute(CLAIM_BEHIND, params)).fetchall()
    for row in rows:
        taken = (-row[PRIORITY_COLUMN], row[RUN_AFTER_COLUMN], row[0])
        if position is None or taken > position:
            position = taken
    return rows, position


LEASE_SECONDS = 30
CLAIM_BATCH = 100


# -- waiting until the database says done -------------------------------------------


class Counter:
    """A no-op handler that sets ``done`` after ``count`` jobs started."""

    def __init__(self, count: int, *, sleep: float = 0.0) -> None:
        self.count = count
        self.sleep = sleep
        self.started = 0
        self.done = anyio.Event()

    async def __call__(self, job: Job) -> None:
        self.started += 1
        if self.started == self.count:
            self.done.set()
        if self.sleep:
            await anyio.sleep(self.sleep)


async def wait_processed(nq: Any, count: int, *, limit: float) -> int:
    """Poll until ``count`` jobs read processed (lease mode writes completions in
    batches, after the handlers return); the number processed when it stopped."""
    done = 0
    with anyio.move_on_after(limit):
        while True:
            async with nq.connection() as conn:
                row = await (
                    await conn.execute("SELECT count(*) FROM neoq_jobs WHERE status = 'processed'")
                ).fetchone()
            done = int(row[0])
            if done >= count:
                break
            await anyio.sleep(0.001)
    return done


# -- lease-mode throughput ----------------------------------------------------------


def bench_lease_ours(dsn: str, loop: str, count: int, concurrency: int, sync: bool) -> float:
    insert_jobs(dsn, "work", count)

    async def main() -> float:
        handle = Counter(count)
        async with open_backend(dsn, synchronous_commit=sync) as nq:
            start = time.perf_counter()
            await nq.start(Handler("work", handle, concurrency=concurrency, execution="lease"))
            with anyio.fail_after(300):
                await handle.done.wait()
            done = await wait_processed(nq, count, limit=60)
            assert done == count, (done, count)
            return count / (time.perf_counter() - start)

    return anyio.run(main, backend=loop)


def bench_lease_floor(dsn: str, count: int, sync: bool) -> float:
    """One connection claims ``CLAIM_BATCH`` jobs per statement; another
    acknowledges whatever has completed since its last statement, in one."""
    ensure_lease_columns(dsn)
    insert_jobs(dsn, "work", count)

    async def main() -> float:
        claimer = await floor_connection(dsn, synchronous_commit=sync)
        acker = await floor_connection(dsn, synchronous_commit=sync)
        completed: asyncio.Queue[list[tuple[int, int]] | None] = asyncio.Queue()
        acknowledged = 0

        async def claim() -> None:
            position: Position | None = None
            while True:
                rows, position = await floor_claim(claimer, "work", CLAIM_BATCH, position)
                if not rows:
                    break
                # The handlers, no-ops, run here; each done job goes to the acker.
                completed.put_nowait([(row[0], row[TOKEN_COLUMN]) for row in rows])
            completed.put_nowait(None)

        async def acknowledge() -> None:
            nonlocal acknowledged
            finished = False
            while not finished:
                batches = [await completed.get()]
                while not completed.empty():
                    batches.append(completed.get_nowait())
                finished = batches[-1] is None
                done = [pair for batch in batches if batch for pair in batch]
                if done:
                    cur = await acker.execute(COMPLETE, array_literals(done))
                    acknowledged += len(await cur.fetchall())

        start = time.perf_counter()
        await asyncio.gather(claim(), acknowledge())
        elapsed = time.perf_counter() - start
        assert acknowledged == count, acknowledged
        await claimer.close()
        await acker.close()
        return count / elapsed

    return asyncio.run(main())


# -- many sleeping jobs on a small pool ---------------------------------------------


def bench_sleepers(dsn: str, loop: str, count: int, concurrency: int, limit: float) -> float:
    """Seconds from ``start`` until ``count`` one-second jobs are processed
    (``limit`` plus a bit when cut off)."""
    insert_jobs(dsn, "sleepy", count)
    pooled = with_pool(dsn, 4)

    async def main() -> float:
        handle = Counter(count, sleep=1.0)
        async with open_backend(pooled, shutdown_timeout=1) as nq:
            start = time.perf_counter()
            await nq.start(
                Handler(
                    "sleepy",
                    handle,
                    concurrency=concurrency,
                    execution="lease",
                    job_timeout=60,
                )
            )
            with anyio.move_on_after(limit):
                await handle.done.wait()
            remaining = max(1.0, limit - (time.perf_counter() - start))
            done = await wait_processed(nq, count, limit=remaining)
            elapsed = time.perf_counter() - start
            if done < count:
                print(f"  sleepers cut after {elapsed:.0f} s: {done} of {count} done", flush=True)
                return math.inf
            return elapsed

    return anyio.run(main, backend=loop)


# -- latency -----------------------------------------------------------------------


def bench_latency_floor(dsn: str, samples: int) -> list[float]:
    ensure_lease_columns(dsn)

    async def main() -> list[float]:
        listen = await floor_connection(dsn)
        worker = await floor_connection(dsn)
        producer = await floor_connection(dsn)
        await listen.execute("LISTEN latency")
        position: Position | None = None
        latencies: list[float] = []
        gen = listen.notifies()
        for n in range(samples + 20):
            sent_at = time.perf_counter()
            await (await producer.execute(INSERT_JOB, payload_params("latency", n))).fetchone()
            await anext(gen)
            # The job starts after the first statement; the look behind the
            # watermark that follows (too few were ahead) is not timed.
            rows, position = await floor_claim(
                worker,
                "latency",
                10,
                position,
                started=lambda sent_at=sent_at: latencies.append(time.perf_counter() - sent_at),
            )
            assert len(rows) == 1, rows
            await worker.execute(COMPLETE, array_literals([(rows[0][0], rows[0][TOKEN_COLUMN])]))
            await asyncio.sleep(0.005)  # idle, as the backend's workers are between samples
        await gen.aclose()
        for conn in (listen, worker, producer):
            await conn.close()
        return latencies[20:]

    return asyncio.run(main())


# -- the run ---------------------------------------------------------------------------


def run(dsn: str, *, quick: bool, rounds: int, syncs: list[bool]) -> list[Row]:
    count = 2000 if quick else 10_000
    sleepers = 2000 if quick else 10_000
    samples = 50 if quick else 300
    rows: list[Row] = []

    def scenario(fn: Any, *args: Any) -> Any:
        with fresh_schema(dsn) as scoped:
            return fn(scoped, *args)

    for sync in syncs:
        label = "on" if sync else "off"
        floor, got = paired(
            rounds,
            lambda sync=sync: scenario(bench_lease_floor, count, sync),
            {
                loop: (
                    lambda loop=loop, sync=sync: scenario(bench_lease_ours, loop, count, 50, sync)
                )
                for loop in LOOPS
            },
        )
        for loop in LOOPS:
            figure, ratio = got[loop]
            rows.append(
                Row(
                    f"lease: process {count} no-op, c=50, sync {label} (jobs/s)",
                    loop,
                    figure,
                    floor,
                    "/s",
                    ">= 50%",
                    ratio=ratio,
                )
            )
    target = sleepers / 1000 * 1.5
    for loop in LOOPS:
        wall = scenario(bench_sleepers, loop, sleepers, 1000, max(60.0, 4 * target))
        rows.append(
            Row(
                f"lease: {sleepers} x sleep(1 s), c=1000, 4 conns (s)",
                loop,
                wall,
                None,
                "s",
                f"<= {target:.0f} s",
                higher_is_better=False,
            )
        )
    floor_lat = scenario(bench_latency_floor, samples)
    for loop in LOOPS:
        ours_lat = scenario(
            partial(bench_latency_ours, execution="lease", idle=0.005), loop, samples
        )
        for name, q, target_text in (("p50", 0.5, "< 2 ms"), ("p90", 0.9, ""), ("p99", 0.99, "")):
            rows.append(
                Row(
                    f"lease: enqueue-to-start latency {name} (ms)",
                    loop,
                    percentile(ours_lat, q) * 1000,
                    percentile(floor_lat, q) * 1000,
                    "ms",
                    target_text,
                    higher_is_better=False,
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", help="PostgreSQL to use (default: an embedded server)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds (throughput: median ratio)"
    )
    parser.add_argument(
        "--sync-commit",
        choices=("off", "on", "both"),
        default="both",
        help="synchronous_commit of the throughput rows (default: both)",
    )
    args = parser.parse_args(argv)
    with servers(args.dsn) as dsn:
        server = describe_server(dsn)
        rows = run(dsn, quick=args.quick, rounds=args.rounds, syncs=sync_modes(args.sync_commit))
    print(f"server: {'embedded ' if not args.dsn else ''}{server}\n")
    print_table(
        rows,
        note="reference: raw psycopg on asyncio running the same SQL; "
        "sync on/off: synchronous_commit of ours and of its floor.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
