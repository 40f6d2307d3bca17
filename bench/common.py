"""What the benchmark scripts share: fresh schemas, the floors' connections,
bulk inserts, a held transaction, the server's description and the table.

Not a benchmark itself; ``bench.py``, ``lease.py`` and ``backlog.py`` import
it (their directory is on ``sys.path`` when they run as scripts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
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
from neoq_anyio.embedded import embedded_postgres

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

LOOPS = ("asyncio", "trio")


# -- schema per scenario ------------------------------------------------------------


@contextlib.contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a new schema with neoq's tables; dropped afterwards.

    The DSN comes back in ``key=value`` form, so ``pool_*`` options can be
    appended to it with a space.
    """
    name = f"bench_{uuid.uuid4().hex[:10]}"
    scoped = make_conninfo(dsn, options=f"-csearch_path={name}")

    async def setup() -> None:
        # Opening a backend creates the schema and neoq's tables in it.
        async with open_backend(scoped):
            pass

    anyio.run(setup)
    try:
        yield scoped
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def with_pool(dsn: str, max_conns: int | None) -> str:
    """``dsn`` (``key=value`` form) with ``pool_max_conns``; unchanged for None."""
    return dsn if max_conns is None else f"{dsn} pool_max_conns={max_conns:d}"


@contextlib.contextmanager
def servers(dsn: str | None) -> Iterator[str]:
    """The server to measure: ``dsn``, or an embedded one for the block."""
    if dsn:
        yield dsn
    else:
        with embedded_postgres() as embedded:
            yield embedded


def describe_server(dsn: str) -> str:
    """One line: version and the settings that move the numbers."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('autovacuum', 'synchronous_commit', 'fsync', 'shared_buffers', "
                "'max_connections')"
            ).fetchall()
        )
    buffers_mib = int(settings["shared_buffers"]) * 8 // 1024
    return (
        f"PostgreSQL {version[0] if version else '?'}: autovacuum {settings['autovacuum']}, "
        f"fsync {settings['fsync']}, shared_buffers {buffers_mib} MiB, "
        f"max_connections {settings['max_connections']}"
    )


# -- the floors ----------------------------------------------------------------------

LEASE_COLUMNS = (
    "ALTER TABLE neoq_jobs ADD COLUMN IF NOT EXISTS lease_token bigint; "
    "ALTER TABLE neoq_jobs ADD COLUMN IF NOT EXISTS lease_expires_at timestamptz; "
    "ALTER TABLE neoq_jobs ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0; "
    "CREATE INDEX IF NOT EXISTS neoq_anyio_jobs_ready_idx "
    "ON neoq_jobs (queue, (-priority::integer), run_after, id) "
    "WHERE status <> 'processed' AND lease_token IS NULL"
)
"""What schema.sql's lease and priority versions add, for a floor run on a
schema from before them (the floors' statements name these columns)."""


def ensure_lease_columns(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(LEASE_COLUMNS)


async def floor_connection(
    dsn: str, *, synchronous_commit: bool = False
) -> psycopg.AsyncConnection[Any]:
    """A raw psycopg connection set up as the backend sets up its sessions:
    UTC, an idle-in-transaction bound, and ``synchronous_commit`` off unless kept."""
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    settings = "SET TimeZone = 'UTC'; SET idle_in_transaction_session_timeout = 33000"
    if not synchronous_commit:
        settings += "; SET synchronous_commit = off"
    await conn.execute(settings)
    return conn


INSERT_JOB = (
    "INSERT INTO neoq_jobs (queue, fingerprint, payload, run_after, deadline) "
    "VALUES (%s, %s, %s::jsonb, coalesce(%s, now()), %s) "
    "ON CONFLICT DO NOTHING RETURNING id"
)
"""One job, as the backend enqueues it (``payload_params``); keep it in step
with neoq_anyio/_postgres/_sql.py."""


def payload_params(queue: str, n: int) -> tuple[Any, ...]:
    """The parameters the backend sends to enqueue ``Job(queue, {"n": n})``."""
    text = json.dumps({"n": n}, sort_keys=True, separators=(",", ":"))
    return (queue, fingerprint(queue, text), text, None, None)


def fingerprint(queue: str, payload_text: str) -> str:
    return hashlib.md5((queue + payload_text).encode(), usedforsecurity=False).hexdigest()


INSERT_MANY = (
    "INSERT INTO neoq_jobs (queue, fingerprint, payload) "
    "SELECT %s, f, p::jsonb FROM unnest(%s::text[], %s::text[]) AS d(f, p) "
    "ON CONFLICT DO NOTHING"
)
"""Many jobs in one statement: the raw multi-row INSERT."""


def insert_jobs(dsn: str, queue: str, count: int, *, batch: int = 10_000) -> float:
    """Insert ``count`` due jobs, ``batch`` per statement; seconds taken."""
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        for first in range(0, count, batch):
            texts = [
                json.dumps({"n": n}, separators=(",", ":"))
                for n in range(first, min(count, first + batch))
            ]
            prints = [fingerprint(queue, text) for text in texts]
            conn.execute(INSERT_MANY, (queue, prints, texts))
    return time.perf_counter() - started


def jobs(queue: str, first: int, count: int) -> list[Job]:
    return [Job(queue, {"n": n}) for n in range(first, first + count)]


# -- a transaction held open elsewhere ----------------------------------------------


@contextlib.contextmanager
def held_transaction(dsn: str) -> Iterator[int]:
    """A session idle in a transaction that holds an xid for the block: the xmin
    horizon stays put, so no row deleted or updated meanwhile can be cleaned up.

    Yields the held xid. Raises on exit if the session did not survive the block.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET idle_in_transaction_session_timeout = 0")
        conn.execute("SET statement_timeout = 0")
        conn.execute("BEGIN")
        row = conn.execute("SELECT txid_current()").fetchone()
        assert row is not None
        yield int(row[0])
        still = conn.execute("SELECT txid_current()").fetchone()
        if still is None or still[0] != row[0]:
            raise RuntimeError("the held transaction was lost")
        conn.execute("ROLLBACK")


def sync_modes(choice: str) -> list[bool]:
    """``--sync-commit off|on|both`` as the ``synchronous_commit`` values to run."""
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


# -- statistics and the table -------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def best_of(
    rounds: int, fns: dict[str, Callable[[], float]], *, lowest: bool = False
) -> dict[str, float]:
    """Alternate the measurements for ``rounds`` rounds and keep each one's best
    (the highest, or the ``lowest``), so a burst of load on the shared machine
    does not pick a winner. A measurement that fails is reported on stderr and
    counts as NaN: a feature not there yet leaves a hole, not a dead run."""
    results: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            value = attempt(name, fn)
            old = results.get(name, math.nan)
            if math.isnan(old) or (value < old if lowest else value > old):
                results[name] = value
    return results


def paired(
    rounds: int, floor: Callable[[], float], fns: dict[str, Callable[[], float]]
) -> tuple[float, dict[str, tuple[float, float]]]:
    """Measure ``floor`` before and after each round of ``fns``, for ``rounds``
    rounds, and take each measurement's ratio against the mean of the two
    floors around it: on a shared machine whose speed drifts by a third
    within minutes, a ratio of neighbours holds still where best-of figures
    measured minutes apart do not. Returns the median floor and, per name,
    the median figure and the median ratio (higher is better)."""
    floors: list[float] = []
    figures: dict[str, list[float]] = {name: [] for name in fns}
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    before = attempt("floor", floor)
    for _ in range(rounds):
        got = {name: attempt(name, fn) for name, fn in fns.items()}
        after = attempt("floor", floor)
        floors += [before, after]
        for name, value in got.items():
            figures[name].append(value)
            ratios[name].append(value / ((before + after) / 2))
        before = after
    return statistics.median(floors), {
        name: (statistics.median(figures[name]), statistics.median(ratios[name])) for name in fns
    }


def attempt(name: str, fn: Callable[[], float]) -> float:
    """``fn()``, or NaN (and the error on stderr) if it raises."""
    try:
        return fn()
    except Exception as exc:
        print(f"  {name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return math.nan


@dataclass
class Row:
    """One line of the table: our figure beside a reference measured in the same run."""

    metric: str
    loop: str
    ours: float
    floor: float | None  # the reference; None when there is none
    unit: str
    target: str
    higher_is_better: bool = True
    times: bool = False  # show the ratio as "25.3x" instead of a percentage
    ratio: float | None = None  # measured as such (``paired``), not ours / floor

    @property
    def ratio_text(self) -> str:
        if self.floor is None:
            return "-"
        if math.isnan(self.ours) or math.isnan(self.floor):
            return "failed"
        if self.ratio is not None:
            ratio = self.ratio
        else:
            ratio = self.ours / self.floor if self.higher_is_better else self.floor / self.ours
        return f"{ratio:.1f}x" if self.times else f"{ratio:.0%}"


def print_table(rows: list[Row], *, note: str = "") -> None:
    width = max([44, *(len(r.metric) for r in rows)])
    header = (
        f"{'metric':<{width}} {'loop':<8} {'neoq_anyio':>13} {'reference':>13} {'ratio':>7}  target"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        floor = "" if r.floor is None else f"{r.floor:>10.1f} {r.unit:<3}"
        print(
            f"{r.metric:<{width}} {r.loop:<8} {r.ours:>10.1f} {r.unit:<3}"
            f" {floor:>13} {r.ratio_text:>7}  {r.target}"
        )
    if note:
        print(f"\n{note}")


def bench_latency_ours(
    dsn: str, loop: str, samples: int, *, execution: str = "transaction", idle: float = 0.002
) -> list[float]:
    """Seconds from ``enqueue`` to the handler's start, one job at a time,
    with the workers idle ``idle`` seconds between samples (20 warm-up
    samples dropped)."""

    async def main() -> list[float]:
        latencies: list[float] = []
        started = anyio.Event()
        sent_at = 0.0

        async def handle(job: Job) -> None:
            latencies.append(time.perf_counter() - sent_at)
            started.set()

        async with open_backend(dsn) as nq:
            handler = Handler("latency", handle, concurrency=10, execution=execution)  # type: ignore[arg-type]
            await nq.start(handler)
            for n in range(samples + 20):
                started = anyio.Event()
                sent_at = time.perf_counter()
                await nq.enqueue(Job("latency", {"n": n}))
                with anyio.fail_after(10):
                    await started.wait()
                await anyio.sleep(idle)  # let the last completion be written
        return latencies[20:]

    return anyio.run(main, backend=loop)
