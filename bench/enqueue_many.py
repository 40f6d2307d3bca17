"""Batched enqueue beside a raw-psycopg floor.

Run: ``python bench/enqueue_many.py`` (embedded PostgreSQL) or
``python bench/enqueue_many.py --dsn postgresql://...``; ``--quick --rounds
1`` for a smoke run; ``--sync-commit on|off|both`` (default both).

``nq.enqueue_many`` inserts 50,000 jobs in batches of 1,000, on asyncio and
trio, beside a floor that sends the same multi-row INSERT (one array per
column through ``unnest``, copied below from
``neoq_anyio/_postgres/_enqueue_many.py``) on one raw psycopg connection.
Both encode the payloads (JSON) and fingerprints (MD5) while timed; the
``Job`` objects are built beforehand. Each measurement runs in a fresh
schema. The floor uses the ``synchronous_commit`` of the row it sits beside
(the backend's default, ``synchronous_commit=False``, sets it off).

Target: >= 80 % of the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import anyio
from common import (
    LOOPS,
    Row,
    best_of,
    describe_server,
    fingerprint,
    floor_connection,
    fresh_schema,
    jobs,
    print_table,
    servers,
    sync_modes,
)

from neoq_anyio import open_backend

# The INSERT of neoq_anyio/_postgres/_enqueue_many.py (notify=False: the pool's
# sessions are in UTC, so the trigger announces due jobs); keep it in step with it.
INSERT_BATCH = (
    "INSERT INTO neoq_jobs "
    "(queue, fingerprint, payload, run_after, deadline, max_retries, trace_context, "
    "priority) "
    "SELECT queue, fingerprint, payload::jsonb, coalesce(run_after, now()), deadline, "
    "coalesce(max_retries, 23), trace_context::jsonb, priority "
    "FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[], "
    "%s::timestamptz[], %s::int4[], %s::text[], %s::int2[]) WITH ORDINALITY "
    "AS batch (queue, fingerprint, payload, run_after, deadline, max_retries, "
    "trace_context, priority, position) "
    "ORDER BY position "
    "ON CONFLICT DO NOTHING RETURNING id, queue, fingerprint"
)
WARM_BATCHES = 3


def bench_ours(dsn: str, loop: str, count: int, batch: int, sync: bool) -> float:
    warm = [jobs("warm", n * batch, batch) for n in range(WARM_BATCHES)]
    batches = [jobs("bench", first, batch) for first in range(0, count, batch)]

    async def main() -> float:
        async with open_backend(dsn, synchronous_commit=sync) as nq:
            for some in warm:
                await nq.enqueue_many(some)
            start = time.perf_counter()
            for some in batches:
                ids = await nq.enqueue_many(some)
            elapsed = time.perf_counter() - start
            assert None not in ids
            return count / elapsed

    return anyio.run(main, backend=loop)


def bench_floor(dsn: str, count: int, batch: int, sync: bool) -> float:
    def params(queue: str, first: int) -> tuple[list[Any], ...]:
        texts = [
            json.dumps({"n": n}, sort_keys=True, separators=(",", ":"))
            for n in range(first, first + batch)
        ]
        nulls = [None] * batch
        return (
            [queue] * batch,
            [fingerprint(queue, text) for text in texts],
            texts,
            nulls,
            nulls,
            nulls,
            nulls,
            [0] * batch,
        )

    async def main() -> float:
        conn = await floor_connection(dsn, synchronous_commit=sync)
        async with conn:
            for n in range(WARM_BATCHES):
                await (await conn.execute(INSERT_BATCH, params("warm", n * batch))).fetchall()
            start = time.perf_counter()
            for first in range(0, count, batch):
                rows = await (await conn.execute(INSERT_BATCH, params("bench", first))).fetchall()
                assert len(rows) == batch
            return count / (time.perf_counter() - start)

    return asyncio.run(main())


def run(dsn: str, *, quick: bool, rounds: int, syncs: list[bool]) -> list[Row]:
    count = 10_000 if quick else 50_000
    batch = 1000
    rows: list[Row] = []

    def scenario(fn: object, *args: object) -> float:
        with fresh_schema(dsn) as scoped:
            return fn(scoped, *args)  # type: ignore[operator,no-any-return]

    for sync in syncs:
        got = best_of(
            rounds,
            {
                "floor": lambda sync=sync: scenario(bench_floor, count, batch, sync),
                **{
                    loop: (
                        lambda loop=loop, sync=sync: scenario(bench_ours, loop, count, batch, sync)
                    )
                    for loop in LOOPS
                },
            },
        )
        for loop in LOOPS:
            rows.append(
                Row(
                    f"enqueue_many: {count} in batches of {batch}, sync {'on' if sync else 'off'}",
                    loop,
                    got[loop],
                    got["floor"],
                    "/s",
                    ">= 80%",
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", help="PostgreSQL to use (default: an embedded server)")
    parser.add_argument("--quick", action="store_true", help="10,000 jobs, for a smoke run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (best kept)")
    parser.add_argument("--sync-commit", choices=("off", "on", "both"), default="both")
    args = parser.parse_args(argv)
    modes = sync_modes(args.sync_commit)
    with servers(args.dsn) as dsn:
        server = describe_server(dsn)
        rows = run(dsn, quick=args.quick, rounds=args.rounds, syncs=modes)
    print(f"server: {'embedded ' if not args.dsn else ''}{server}\n")
    print_table(
        rows,
        note="reference: raw psycopg on asyncio sending the same INSERT, jobs/s; "
        "sync on/off: synchronous_commit of both.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
