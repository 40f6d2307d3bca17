"""Lease mode beside raw-psycopg floors: throughput, many sleeping jobs, latency.

Run: ``python bench/lease.py`` (embedded PostgreSQL) or
``python bench/lease.py --dsn postgresql://...``; ``--quick --rounds 1`` for
a smoke run; ``--sync-commit on|off|both`` (default both) for the
throughput rows.

Scenarios, each in a fresh schema, on asyncio and trio:

- ``Handler(q, noop, concurrency=50, execution="lease")`` processing 10,000
  due no-op jobs, beside a floor that runs the same claim statement for 100
  jobs at a time on one connection and acknowledges completed jobs in
  batches on another (the statements are copied below from
  ``neoq_anyio/_postgres/_sql.py``). Timed until the database has every job
  processed. Target: >= 50 % of the floor.
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
from typing import Any

import anyio
from common import (
    LOOPS,
    Row,
    best_of,
    describe_server,
    ensure_lease_columns,
    floor_connection,
    fresh_schema,
    insert_jobs,
    payload_params,
    percentile,
    print_table,
    servers,
    sync_modes,
    with_pool,
)

from neoq_anyio import Handler, Job, open_backend

# -- the floor's SQL -------------------------------------------------------------------
# The lease-mode statements of neoq_anyio/_postgres/_sql.py (claim_ready without a
# watermark, COMPLETE_LEASED); keep them in step with it.

CLAIM = (
    "WITH c AS (SELECT id, coalesce(retries, 0) AS retries, NULL::bigint AS token "
    "FROM neoq_jobs WHERE queue = %(queue)s AND status <> 'processed' "
    "AND lease_token IS NULL AND run_after <= now() "
    "ORDER BY run_after, id LIMIT %(n)s FOR UPDATE SKIP LOCKED) "
    "UPDATE neoq_jobs AS j SET lease_token = txid_current(), "
    "lease_expires_at = now() + make_interval(secs => %(lease)s), "
    "retries = c.retries + (j.status = 'failed')::int "
    "FROM c WHERE j.id = c.id RETURNING j.id, j.fingerprint, j.queue, j.status, "
    "j.deadline, j.payload, j.retries, j.max_retries, j.run_after, j.ran_at, "
    "j.created_at, j.error, j.trace_context, c.retries AS previous_retries, "
    "j.lease_token, c.token AS previous_token"
)
TOKEN_COLUMN = 14  # of CLAIM's row
COMPLETE = (
    "UPDATE neoq_jobs AS j SET status = 'processed', ran_at = now(), error = NULL, "
    "lease_token = NULL, lease_expires_at = NULL "
    "FROM unnest(%s::bigint[], %s::bigint[]) AS d(id, token) "
    "WHERE j.id = d.id AND j.lease_token = d.token RETURNING j.id"
)
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
        claim_params = {"queue": "work", "n": CLAIM_BATCH, "lease": LEASE_SECONDS}

        async def claim() -> None:
            while True:
                rows = await (await claimer.execute(CLAIM, claim_params)).fetchall()
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
                    ids, tokens = zip(*done, strict=True)
                    cur = await acker.execute(COMPLETE, (list(ids), list(tokens)))
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


def bench_latency_ours(dsn: str, loop: str, samples: int) -> list[float]:
    async def main() -> list[float]:
        latencies: list[float] = []
        started = anyio.Event()
        sent_at = 0.0

        async def handle(job: Job) -> None:
            latencies.append(time.perf_counter() - sent_at)
            started.set()

        async with open_backend(dsn) as nq:
            await nq.start(Handler("latency", handle, concurrency=10, execution="lease"))
            for n in range(samples + 20):
                started = anyio.Event()
                sent_at = time.perf_counter()
                await nq.enqueue(Job("latency", {"n": n}))
                with anyio.fail_after(10):
                    await started.wait()
                await anyio.sleep(0.005)  # idle workers: let the last completion be written
        return latencies[20:]

    return anyio.run(main, backend=loop)


INSERT_JOB = (
    "INSERT INTO neoq_jobs (queue, fingerprint, payload, run_after, deadline) "
    "VALUES (%s, %s, %s::jsonb, coalesce(%s, now()), %s) "
    "ON CONFLICT DO NOTHING RETURNING id"
)


def bench_latency_floor(dsn: str, samples: int) -> list[float]:
    ensure_lease_columns(dsn)

    async def main() -> list[float]:
        listen = await floor_connection(dsn)
        worker = await floor_connection(dsn)
        producer = await floor_connection(dsn)
        await listen.execute("LISTEN latency")
        claim_params = {"queue": "latency", "n": 10, "lease": LEASE_SECONDS}
        latencies: list[float] = []
        gen = listen.notifies()
        for n in range(samples + 20):
            sent_at = time.perf_counter()
            await (await producer.execute(INSERT_JOB, payload_params("latency", n))).fetchone()
            await anext(gen)
            row = await (await worker.execute(CLAIM, claim_params)).fetchone()
            assert row is not None
            latencies.append(time.perf_counter() - sent_at)
            await worker.execute(COMPLETE, ([row[0]], [row[TOKEN_COLUMN]]))
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
        got = best_of(
            rounds,
            {
                "floor": lambda sync=sync: scenario(bench_lease_floor, count, sync),
                **{
                    loop: (
                        lambda loop=loop, sync=sync: scenario(
                            bench_lease_ours, loop, count, 50, sync
                        )
                    )
                    for loop in LOOPS
                },
            },
        )
        for loop in LOOPS:
            rows.append(
                Row(
                    f"lease: process {count} no-op, c=50, sync {label} (jobs/s)",
                    loop,
                    got[loop],
                    got["floor"],
                    "/s",
                    ">= 50%",
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
        ours_lat = scenario(bench_latency_ours, loop, samples)
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
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (best kept)")
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
