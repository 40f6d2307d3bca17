"""neoq_anyio benchmark: throughput and latency beside a raw-psycopg floor.

Run: ``python bench/bench.py`` (embedded PostgreSQL) or
``python bench/bench.py --dsn postgresql://...``; ``--quick --rounds 1`` for
a smoke run; ``--sync-commit on|off|both`` (default both) for the enqueue
and transaction-mode rows.

Every figure is printed beside a *floor*: psycopg's own AsyncConnection on
asyncio running exactly the same SQL as the PostgreSQL backend (the statements
are written out below, copied from ``neoq_anyio/_postgres/_sql.py``), with
nothing else around it. The benchmark uses neoq_anyio's public API only. The ratio
neoq_anyio / floor is what to watch: absolute numbers swing with the
machine's load, ratios taken in one run do not. Each scenario runs in a
fresh schema, so table bloat from one does not slow the next.

Transaction mode (the default) processes 10,000 no-op jobs at concurrency 10
and 50 (the pool sized to match) beside a floor with as many connections,
each taking and completing one job per transaction, taking jobs after a
shared watermark as the backend does. Synchronous commit: the
backend's default (``synchronous_commit=False``) sets it off per session;
"on" keeps the server's setting. Each floor uses the setting of the row it
sits beside.

Targets: transaction-mode processing >= 80 % of the floor, at c=10 and
c=50, synchronous commit on and off; enqueue >= 70 %; p50 enqueue-to-start
latency < 10 ms; processing with Prometheus metrics on >= 95 % of the same
with them off; the in-memory backend processes at least 20x faster than the
PostgreSQL backend, and holds a million queued no-op jobs in under 1.5 GiB.

Lease mode is in ``lease.py``, batched enqueue in ``enqueue_many.py``,
backlogs in ``backlog.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from common import (
    INSERT_JOB,
    LOOPS,
    Row,
    bench_latency_ours,
    best_of,
    describe_server,
    ensure_lease_columns,
    floor_connection,
    fresh_schema,
    payload_params,
    percentile,
    print_table,
    servers,
    sync_modes,
)
from prometheus_client import CollectorRegistry
from psycopg import sql

from neoq_anyio import Handler, Job, open_backend

if TYPE_CHECKING:
    from collections.abc import Callable

# -- the floor's SQL -------------------------------------------------------------------
# The statements the PostgreSQL backend runs to enqueue, take and complete a job, as in
# neoq_anyio/_postgres/_sql.py; keep them in step with it.

JOB_COLUMNS = (
    "id, fingerprint, queue, status, deadline, payload, retries, max_retries, "
    "run_after, ran_at, created_at, error, priority, trace_context"
)
RETRIES_COLUMN = 6  # of JOB_COLUMNS
RUN_AFTER_COLUMN = 8
PRIORITY_COLUMN = 12
CLAIM_ORDER = "-priority::integer, run_after, id"  # neoq_anyio_jobs_ready_idx's key

Position = tuple[int, datetime, int]  # (-priority, run_after, id): the watermark


def next_job(queue: str, extra: str = "", limit: str = "1") -> str:
    return (
        f"SELECT {JOB_COLUMNS} FROM neoq_jobs WHERE queue = {queue} "
        "AND status <> 'processed' AND lease_token IS NULL "
        f"AND run_after <= now(){extra} ORDER BY {CLAIM_ORDER} "
        f"LIMIT {limit} FOR UPDATE SKIP LOCKED"
    )


def take_job(
    queue: str,
    conn: psycopg.AsyncConnection[Any],
    position: Position | None = None,
    *,
    behind: bool = False,
) -> str:
    """``BEGIN; <the locking SELECT>; SAVEPOINT``, sent in one simple-protocol round
    trip; only jobs after ``position`` in claim order, or of a higher priority
    (``behind``: at or before it), as the backend's watermark does
    (neoq_anyio/_postgres/_watermark.py, ``TakeQuery``)."""
    literal = sql.Literal(queue).as_string(conn)
    if position is None:
        select = next_job(literal)
    else:
        negated, run_after, job_id = position
        key = f"({negated:d}, '{run_after.isoformat()}'::timestamptz, {job_id:d})"
        if behind:
            select = next_job(literal, f" AND (-priority::integer, run_after, id) <= {key}")
        else:
            higher = next_job(literal, f" AND -priority::integer < {negated:d}")
            ahead = next_job(
                literal,
                f" AND (-priority::integer, run_after, id) > {key}",
                "(1 - (SELECT count(*) FROM higher))",
            )
            select = (
                f"WITH higher AS ({higher}), ahead AS ({ahead}) "
                "SELECT * FROM higher UNION ALL SELECT * FROM ahead"
            )
    return f"BEGIN; {select}; SAVEPOINT neoq_job"


def complete_job(job_id: int, retries: int) -> str:
    """Mark a job processed and commit its transaction."""
    return (
        "SET CONSTRAINTS ALL IMMEDIATE; RELEASE SAVEPOINT neoq_job; "
        "UPDATE neoq_jobs SET status = 'processed', ran_at = now(), error = NULL, "
        f"retries = {retries:d} WHERE id = {job_id:d}; COMMIT"
    )


class Counter:
    """A no-op handler that sets ``done`` after ``count`` jobs."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.processed = 0
        self.done = anyio.Event()

    async def __call__(self, job: Job) -> None:
        self.processed += 1
        if self.processed == self.count:
            self.done.set()


# -- enqueue ---------------------------------------------------------------------------


def bench_enqueue_ours(dsn: str, loop: str, count: int, sync: bool = False) -> float:
    async def main() -> float:
        async with open_backend(dsn, synchronous_commit=sync) as nq:
            for n in range(50):  # warm the pool and psycopg's prepared statements
                await nq.enqueue(Job("warm", {"n": n}))
            start = time.perf_counter()
            for n in range(count):
                await nq.enqueue(Job("bench", {"n": n}))
            return count / (time.perf_counter() - start)

    return anyio.run(main, backend=loop)


def bench_enqueue_floor(dsn: str, count: int, sync: bool = False) -> float:
    async def main() -> float:
        conn = await floor_connection(dsn, synchronous_commit=sync)
        async with conn:
            for n in range(50):
                await (await conn.execute(INSERT_JOB, payload_params("warm", n))).fetchone()
            start = time.perf_counter()
            for n in range(count):
                await (await conn.execute(INSERT_JOB, payload_params("bench", n))).fetchone()
            return count / (time.perf_counter() - start)

    return asyncio.run(main())


# -- processing ---------------------------------------------------------------------


def insert_backlog(dsn: str, queue: str, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO neoq_jobs (queue, fingerprint, payload) "
            "SELECT %s, md5(i::text), jsonb_build_object('n', i) FROM generate_series(1, %s) i",
            (queue, count),
        )
        conn.execute("ANALYZE neoq_jobs")


def bench_process_ours(
    dsn: str, loop: str, count: int, concurrency: int, *, metrics: bool = False, sync: bool = False
) -> float:
    insert_backlog(dsn, "work", count)
    scoped = f"{dsn} pool_max_conns={concurrency + 2}"  # fresh_schema gives key=value form

    async def main() -> float:
        handle = Counter(count)
        done = handle.done
        # A registry per run: the counts of one run do not pile onto the next.
        registry: Any = CollectorRegistry() if metrics else False

        async with open_backend(scoped, metrics=registry, synchronous_commit=sync) as nq:
            start = time.perf_counter()
            await nq.start(Handler("work", handle, concurrency=concurrency))
            with anyio.fail_after(300):
                await done.wait()
            return count / (time.perf_counter() - start)

    return anyio.run(main, backend=loop)


def bench_process_floor(dsn: str, count: int, concurrency: int, sync: bool = False) -> float:
    """One connection per job in flight, each taking and completing one job per
    transaction, as transaction mode does."""
    ensure_lease_columns(dsn)  # a schema from before lease mode: NEXT_JOB names them
    insert_backlog(dsn, "work", count)

    async def main() -> float:
        conns = [await floor_connection(dsn, synchronous_commit=sync) for _ in range(concurrency)]
        processed = 0
        watermark: Position | None = None  # one per queue and process, as in the backend

        async def take(
            conn: psycopg.AsyncConnection[Any], position: Position | None, *, behind: bool = False
        ) -> tuple[Any, ...] | None:
            cur = await conn.execute(take_job("work", conn, position, behind=behind))
            cur.nextset()
            row = await cur.fetchone()
            if row is None:
                await conn.execute("ROLLBACK")
            return row

        async def worker(conn: psycopg.AsyncConnection[Any]) -> None:
            nonlocal processed, watermark
            while True:
                position = watermark
                row = await take(conn, position)
                if row is None and position is not None:
                    row = await take(conn, position, behind=True)
                if row is None:
                    return
                taken = (-row[PRIORITY_COLUMN], row[RUN_AFTER_COLUMN], row[0])
                if watermark is None or taken > watermark:
                    watermark = taken
                await conn.execute(complete_job(row[0], row[RETRIES_COLUMN] or 0))
                processed += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        elapsed = time.perf_counter() - start
        assert processed == count, processed
        for conn in conns:
            await conn.close()
        return count / elapsed

    return asyncio.run(main())


# -- latency -----------------------------------------------------------------------


def bench_latency_floor(dsn: str, samples: int) -> list[float]:
    ensure_lease_columns(dsn)

    async def main() -> list[float]:
        listen = await floor_connection(dsn)
        worker = await floor_connection(dsn)
        producer = await floor_connection(dsn)
        await listen.execute("LISTEN latency")
        latencies: list[float] = []
        gen = listen.notifies()
        for n in range(samples + 20):
            sent_at = time.perf_counter()
            await (await producer.execute(INSERT_JOB, payload_params("latency", n))).fetchone()
            await anext(gen)
            cur = await worker.execute(take_job("latency", worker))
            cur.nextset()
            row = await cur.fetchone()
            assert row is not None
            latencies.append(time.perf_counter() - sent_at)
            await worker.execute(complete_job(row[0], 0))
        await gen.aclose()
        for conn in (listen, worker, producer):
            await conn.close()
        return latencies[20:]

    return asyncio.run(main())


# -- in memory --------------------------------------------------------------------------


def bench_process_memory(loop: str, count: int, concurrency: int) -> float:
    async def main() -> float:
        handle = Counter(count)
        done = handle.done

        async with open_backend() as nq:
            for n in range(count):
                await nq.enqueue(Job("work", {"n": n}))
            start = time.perf_counter()
            await nq.start(Handler("work", handle, concurrency=concurrency))
            await done.wait()
            return count / (time.perf_counter() - start)

    return anyio.run(main, backend=loop)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_memory_million(loop: str, count: int) -> dict[str, float]:
    """Run in a fresh interpreter, so the RSS growth is the jobs' alone."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-million", loop, str(count)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def memory_million_child(loop: str, count: int) -> None:
    async def main() -> dict[str, float]:
        handle = Counter(count)
        done = handle.done

        async with open_backend() as nq:
            before = _rss_mib()
            for n in range(count):
                await nq.enqueue(Job("work", {"n": n}))
            rss = _rss_mib() - before
            start = time.perf_counter()
            await nq.start(Handler("work", handle, concurrency=10))
            await done.wait()
            return {"rss_mib": rss, "process_rate": count / (time.perf_counter() - start)}

    print(json.dumps(anyio.run(main, backend=loop)))


def run(dsn: str, *, quick: bool, rounds: int, syncs: list[bool]) -> list[Row]:
    enqueue_n = 500 if quick else 3000
    process_n = 2000 if quick else 10_000
    samples = 50 if quick else 300
    million = 50_000 if quick else 1_000_000
    rows: list[Row] = []

    def scenario(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with fresh_schema(dsn) as scoped:
            return fn(scoped, *args, **kwargs)

    def best(fns: dict[str, Callable[[], float]]) -> dict[str, float]:
        return best_of(rounds, fns)

    for sync in syncs:
        got = best(
            {
                "floor": lambda sync=sync: scenario(bench_enqueue_floor, enqueue_n, sync),
                **{
                    loop: (
                        lambda loop=loop, sync=sync: scenario(
                            bench_enqueue_ours, loop, enqueue_n, sync
                        )
                    )
                    for loop in LOOPS
                },
            }
        )
        for loop in LOOPS:
            rows.append(
                Row(
                    f"enqueue (jobs/s, one per call), sync {'on' if sync else 'off'}",
                    loop,
                    got[loop],
                    got["floor"],
                    "/s",
                    ">= 70%",
                )
            )
    pg_rate: dict[tuple[str, int], float] = {}
    for sync in syncs:
        for concurrency in (10, 50):
            got = best(
                {
                    "floor": lambda c=concurrency, sync=sync: scenario(
                        bench_process_floor, process_n, c, sync
                    ),
                    **{
                        loop: (
                            lambda loop=loop, c=concurrency, sync=sync: scenario(
                                bench_process_ours, loop, process_n, c, sync=sync
                            )
                        )
                        for loop in LOOPS
                    },
                }
            )
            for loop in LOOPS:
                if not sync:
                    pg_rate[loop, concurrency] = got[loop]
                rows.append(
                    Row(
                        f"transaction: process {process_n} no-op, c={concurrency}, "
                        f"sync {'on' if sync else 'off'} (jobs/s)",
                        loop,
                        got[loop],
                        got["floor"],
                        "/s",
                        ">= 80%",
                    )
                )
    # The cost of metrics: the same no-op processing with and without them,
    # alternated in one run; metrics off is the reference.
    got = best(
        {
            f"{loop} {mode}": (
                lambda loop=loop, mode=mode: scenario(
                    bench_process_ours, loop, process_n, 10, metrics=mode == "on"
                )
            )
            for loop in LOOPS
            for mode in ("off", "on")
        }
    )
    for loop in LOOPS:
        rows.append(
            Row(
                f"process {process_n} no-op, c=10, metrics on vs off",
                loop,
                got[f"{loop} on"],
                got[f"{loop} off"],
                "/s",
                ">= 95%",
            )
        )
    floor_lat = scenario(bench_latency_floor, samples)
    for loop in LOOPS:
        ours_lat = scenario(bench_latency_ours, loop, samples)
        for name, q, target in (("p50", 0.5, "< 10 ms"), ("p99", 0.99, "")):
            rows.append(
                Row(
                    f"enqueue-to-start latency {name} (ms)",
                    loop,
                    percentile(ours_lat, q) * 1000,
                    percentile(floor_lat, q) * 1000,
                    "ms",
                    target,
                    higher_is_better=False,
                )
            )
    for concurrency in (10, 50):
        for loop in LOOPS:
            rate = max(bench_process_memory(loop, process_n, concurrency) for _ in range(rounds))
            rows.append(
                Row(
                    f"memory: process {process_n} no-op, c={concurrency}",
                    loop,
                    rate,
                    pg_rate[loop, concurrency],
                    "/s",
                    ">= 20x",
                    times=True,
                )
            )
    for loop in LOOPS:
        result = bench_memory_million(loop, million)
        rows.append(
            Row(
                f"memory: {million:,} queued no-op jobs: RSS",
                loop,
                result["rss_mib"],
                None,
                "MiB",
                "< 1536 MiB",
            )
        )
        rows.append(
            Row(
                f"memory: process {million:,} no-op, c=10",
                loop,
                result["process_rate"],
                pg_rate[loop, 10],
                "/s",
                ">= 20x",
                times=True,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", help="PostgreSQL to use (default: an embedded server)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (best kept)")
    parser.add_argument(
        "--memory-million", nargs=2, metavar=("LOOP", "COUNT"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--sync-commit",
        choices=("off", "on", "both"),
        default="both",
        help="synchronous_commit of the enqueue and transaction-mode rows (default: both)",
    )
    args = parser.parse_args(argv)
    if args.memory_million:
        memory_million_child(args.memory_million[0], int(args.memory_million[1]))
        return 0
    syncs = sync_modes(args.sync_commit)
    with servers(args.dsn) as dsn:
        server = describe_server(dsn)
        rows = run(dsn, quick=args.quick, rounds=args.rounds, syncs=syncs)
    print(f"server: {'embedded ' if not args.dsn else ''}{server}\n")
    print_table(
        rows,
        note="reference: raw psycopg on asyncio running the same SQL (rows without "
        "'memory'; sync on/off: synchronous_commit of both); the PostgreSQL backend on "
        "the same loop (memory rows).",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
