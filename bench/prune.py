"""Retention under load: does pruning a million processed jobs stall workers?

Run: ``python bench/prune.py`` (embedded PostgreSQL, autovacuum on as in
production) or ``python bench/prune.py --dsn postgresql://...``.

A fresh schema gets ``--rows`` processed jobs that ran two days ago. A
backend with a handler then measures enqueue-to-start latency, one job at a
time: first idle, then while another backend prunes the old rows with the
default retention (one day), in batches of 1,000. The table compares p50
and p99; the target is p99 while pruning within 2x of idle.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import anyio
import psycopg
from common import fresh_schema  # bench/common.py: this directory is on sys.path

from neoq_anyio import Handler, Job, open_backend
from neoq_anyio.embedded import embedded_postgres


def fill(dsn: str, rows: int) -> float:
    """Insert ``rows`` processed jobs that ran two days ago; seconds taken."""
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO neoq_jobs (queue, fingerprint, payload, status, ran_at, run_after) "
            "SELECT 'old', md5(n::text), '{}'::jsonb, 'processed', "
            "now() - interval '2 days', now() - interval '2 days' "
            "FROM generate_series(1, %s) AS n",
            (rows,),
        )
        conn.execute("VACUUM ANALYZE neoq_jobs")
    return time.perf_counter() - started


async def measure(dsn: str, samples: int, rows: int) -> dict[str, list[float]]:
    """Enqueue-to-start latencies (ms), idle and while pruning."""
    started = anyio.Event()

    async def handle(job: Job) -> None:
        started.set()

    latencies: dict[str, list[float]] = {"idle": [], "pruning": []}
    pruned: list[int] = []

    async with open_backend(dsn, keep_processed=None, keep_dead=None) as nq:
        await nq.start(Handler("probe", handle, concurrency=4))

        async def probe(phase: str, until: anyio.Event | None = None) -> None:
            nonlocal started
            n = 0
            while (until is None and n < samples) or (until is not None and not until.is_set()):
                started = anyio.Event()
                t0 = time.perf_counter()
                await nq.enqueue(Job("probe", {"phase": phase, "n": n}))
                with anyio.fail_after(10):
                    await started.wait()
                latencies[phase].append((time.perf_counter() - t0) * 1000)
                n += 1
                await anyio.sleep(0.002)

        await probe("idle")
        done = anyio.Event()

        async def prune() -> None:
            async with open_backend(dsn, keep_processed=None, keep_dead=None) as pruner:
                pruned.append((await pruner._prune(processed_age=86_400, dead_age=None))[0])
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(prune)
            await probe("pruning", done)
    assert pruned == [rows], f"pruned {pruned}, expected {rows}"
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", help="PostgreSQL to use (default: an embedded server)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=500, help="idle latency samples")
    parser.add_argument("--loop", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(embedded_postgres())
        with fresh_schema(dsn) as scoped:
            seconds = fill(scoped, args.rows)
            print(f"inserted {args.rows:,} processed jobs in {seconds:.1f} s")
            t0 = time.perf_counter()
            result = anyio.run(measure, scoped, args.samples, args.rows, backend=args.loop)
            took = time.perf_counter() - t0
    idle, pruning = result["idle"], result["pruning"]
    print(f"{'phase':10} {'samples':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, values in result.items():
        print(f"{name:10} {len(values):8d} {pct(values, 0.5):8.2f} {pct(values, 0.99):8.2f}")
    ratio = pct(pruning, 0.99) / pct(idle, 0.99)
    print(
        f"p99 while pruning / idle: {ratio:.2f}x (target <= 2x); mean "
        f"{statistics.mean(pruning):.2f} vs {statistics.mean(idle):.2f} ms; "
        f"run took {took:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
