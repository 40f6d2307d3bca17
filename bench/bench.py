"""neoq_anyio benchmark: throughput and latency beside a raw-psycopg floor.

Run: ``python bench/bench.py`` (embedded PostgreSQL) or
``python bench/bench.py --dsn postgresql://...``.

Every figure is printed beside a *floor*: psycopg's own AsyncConnection on
asyncio running exactly the same SQL (the statements come from
``neoq_anyio._sql``), with nothing else around it. The ratio
neoq_anyio / floor is what to watch: absolute numbers swing with the
machine's load, ratios taken in one run do not. Each scenario runs in a
fresh schema, so table bloat from one does not slow the next.

Targets: processing >= 50 % of the floor, enqueue >= 70 %, p50
enqueue-to-start latency < 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from neoq_anyio import Handler, Job, open_backend
from neoq_anyio import _sql as neoq_sql
from neoq_anyio._pg._connection import connect as anyio_connect
from neoq_anyio._schema import ensure_schema
from neoq_anyio.embedded import embedded_postgres

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

LOOPS = ("asyncio", "trio")


@dataclass
class Row:
    metric: str
    loop: str
    ours: float
    floor: float
    unit: str
    target: str
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.ours / self.floor
        return self.floor / self.ours


# -- schema per scenario ------------------------------------------------------------


@contextlib.contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a new schema with neoq's tables; dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    scoped = make_conninfo(dsn, options=f"-csearch_path={name}")

    async def setup() -> None:
        conn = await anyio_connect(scoped)
        try:
            await ensure_schema(conn)
        finally:
            await conn.close()

    anyio.run(setup)
    try:
        yield scoped
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


async def floor_connection(dsn: str) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute(
        "SET TimeZone = 'UTC'; SET synchronous_commit = off; "
        "SET idle_in_transaction_session_timeout = 30000"
    )
    return conn


def payload_params(queue: str, n: int) -> tuple[Any, ...]:
    payload = {"n": n}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    fingerprint = hashlib.md5((queue + text).encode(), usedforsecurity=False).hexdigest()
    return (queue, fingerprint, text, None, None)


# -- enqueue ---------------------------------------------------------------------------


def bench_enqueue_ours(dsn: str, loop: str, count: int) -> float:
    async def main() -> float:
        async with open_backend(dsn) as nq:
            for n in range(50):  # warm the pool and psycopg's prepared statements
                await nq.enqueue(Job("warm", {"n": n}))
            start = time.perf_counter()
            for n in range(count):
                await nq.enqueue(Job("bench", {"n": n}))
            return count / (time.perf_counter() - start)

    return anyio.run(main, backend=loop)


def bench_enqueue_floor(dsn: str, count: int) -> float:
    query = neoq_sql.insert_job(default_max_retries=True)

    async def main() -> float:
        conn = await floor_connection(dsn)
        async with conn:
            for n in range(50):
                await (await conn.execute(query, payload_params("warm", n))).fetchone()
            start = time.perf_counter()
            for n in range(count):
                await (await conn.execute(query, payload_params("bench", n))).fetchone()
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


def bench_process_ours(dsn: str, loop: str, count: int, concurrency: int) -> float:
    insert_backlog(dsn, "work", count)
    scoped = f"{dsn} pool_max_conns={concurrency + 2}"  # fresh_schema gives key=value form

    async def main() -> float:
        done = anyio.Event()
        processed = 0

        async def handle(job: Job) -> None:
            nonlocal processed
            processed += 1
            if processed == count:
                done.set()

        async with open_backend(scoped) as nq:
            start = time.perf_counter()
            await nq.start(Handler("work", handle, concurrency=concurrency))
            with anyio.fail_after(300):
                await done.wait()
            return count / (time.perf_counter() - start)

    return anyio.run(main, backend=loop)


def bench_process_floor(dsn: str, count: int, concurrency: int) -> float:
    insert_backlog(dsn, "work", count)

    async def main() -> float:
        conns = [await floor_connection(dsn) for _ in range(concurrency)]
        take = neoq_sql.take_job("work", conns[0])
        processed = 0

        async def worker(conn: psycopg.AsyncConnection[Any]) -> None:
            nonlocal processed
            while True:
                cur = await conn.execute(take)
                cur.nextset()
                row = await cur.fetchone()
                if row is None:
                    await conn.execute("ROLLBACK")
                    return
                await conn.execute(neoq_sql.complete_job(row[0], row[6] or 0))
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


def bench_latency_ours(dsn: str, loop: str, samples: int) -> list[float]:
    async def main() -> list[float]:
        latencies: list[float] = []
        started = anyio.Event()
        sent_at = 0.0

        async def handle(job: Job) -> None:
            latencies.append(time.perf_counter() - sent_at)
            started.set()

        async with open_backend(dsn) as nq:
            await nq.start(Handler("latency", handle, concurrency=10))
            for n in range(samples + 20):
                started = anyio.Event()
                sent_at = time.perf_counter()
                await nq.enqueue(Job("latency", {"n": n}))
                with anyio.fail_after(10):
                    await started.wait()
                await anyio.sleep(0.002)  # idle workers: let the last job finish
        return latencies[20:]

    return anyio.run(main, backend=loop)


def bench_latency_floor(dsn: str, samples: int) -> list[float]:
    async def main() -> list[float]:
        listen = await floor_connection(dsn)
        worker = await floor_connection(dsn)
        producer = await floor_connection(dsn)
        await listen.execute("LISTEN latency")
        insert = neoq_sql.insert_job(default_max_retries=True)
        take = neoq_sql.take_job("latency", worker)
        latencies: list[float] = []
        gen = listen.notifies()
        for n in range(samples + 20):
            sent_at = time.perf_counter()
            await (await producer.execute(insert, payload_params("latency", n))).fetchone()
            await anext(gen)
            cur = await worker.execute(take)
            cur.nextset()
            row = await cur.fetchone()
            assert row is not None
            latencies.append(time.perf_counter() - sent_at)
            await worker.execute(neoq_sql.complete_job(row[0], 0))
        await gen.aclose()
        for conn in (listen, worker, producer):
            await conn.close()
        return latencies[20:]

    return asyncio.run(main())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- table ---------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    header = f"{'metric':<34} {'loop':<8} {'neoq_anyio':>12} {'floor':>12} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.metric:<34} {r.loop:<8} {r.ours:>10.1f} {r.unit[:2]:<1} "
            f"{r.floor:>9.1f} {r.unit[:2]:<2} {r.ratio:>6.0%}  {r.target}"
        )


def run(dsn: str, *, quick: bool) -> list[Row]:
    enqueue_n = 500 if quick else 3000
    process_n = 2000 if quick else 10_000
    samples = 50 if quick else 300
    rows: list[Row] = []

    def scenario(fn: Callable[..., Any], *args: Any) -> Any:
        with fresh_schema(dsn) as scoped:
            return fn(scoped, *args)

    floor = scenario(bench_enqueue_floor, enqueue_n)
    for loop in LOOPS:
        ours = scenario(bench_enqueue_ours, loop, enqueue_n)
        rows.append(Row("enqueue (jobs/s, one per call)", loop, ours, floor, "/s", ">= 70%"))
    for concurrency in (10, 50):
        floor = scenario(bench_process_floor, process_n, concurrency)
        for loop in LOOPS:
            ours = scenario(bench_process_ours, loop, process_n, concurrency)
            rows.append(
                Row(
                    f"process {process_n} no-op, c={concurrency} (jobs/s)",
                    loop,
                    ours,
                    floor,
                    "/s",
                    ">= 50%",
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
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", help="PostgreSQL to use (default: an embedded server)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args(argv)
    if args.dsn:
        rows = run(args.dsn, quick=args.quick)
    else:
        with embedded_postgres() as dsn:
            rows = run(dsn, quick=args.quick)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
