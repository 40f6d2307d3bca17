"""Scale-out: 1, 2, 4 and 8 worker processes on one database, direct and through PgBouncer.

Run: ``python bench/scale_out.py`` (embedded PostgreSQL) or
``python bench/scale_out.py --dsn postgresql://...``; ``--quick`` for a
smoke run. It needs Debian's ``pgbouncer`` (``apt-get install pgbouncer``),
which it starts on a free port in front of the server, in
``pool_mode = transaction`` with ``--pool-size`` server sessions (20).

For each execution mode (``lease``, concurrency 50 per process;
``transaction``, concurrency 4 per process) and each way to the database:

- ``direct``: straight to PostgreSQL, LISTEN included (``pooler=None``);
- ``pgbouncer``: through PgBouncer, ``pooler="transaction"``, no LISTEN
  connection: workers poll every ``job_check_interval`` (1 s, the default);
- ``pgbouncer+listen``: the same, with ``listen_connection_string``
  straight to PostgreSQL;

and for 1, 2, 4 and 8 worker processes (each its own ``open_backend``):

- throughput: the processes start together on a backlog of ``--jobs`` due
  no-op jobs (20,000; ``--quick``: 3,000), timed until the database has
  them all processed;
- server connections: PostgreSQL sessions of the run's role, from
  ``pg_stat_activity`` sampled every 50 ms while the backlog drains (peak);
  client connections: what the processes' pools and listeners hold (peak,
  as each process's ``statistics()`` reports it);
- claim latency: with the workers idle again, ``--latency-jobs`` jobs (100)
  are enqueued 20 ms apart from another process, through the same way to
  the database; each handler measures from just before its ``enqueue()``
  to its own start (p50 and p99, milliseconds).

First, for each way, one process enqueues ``--enqueue-jobs`` jobs (2,000),
one ``enqueue()`` at a time: what no prepared statements and PgBouncer's hop
cost on the enqueue path. One more way is measured there,
``direct+pooler``: straight to PostgreSQL with ``pooler="transaction"``,
which isolates the cost of the option itself. ``--enqueue-only`` stops
after that.

With ``--rounds N`` (2) every configuration runs N times, the
configurations taking turns, and the best of each figure is kept, so a burst
of load on a shared machine does not pick a winner. Each run gets a fresh
role and schema (``tests/_pgbouncer.pooled_database``: the role's
search_path picks the schema, which PgBouncer 1.18 allows where the
``options`` startup parameter is refused). ``pending_job_check_interval``
is 5 s in every run, so a lost wake-up shows as a latency near 5 s instead of
stalling the run for a minute.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.process
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import psycopg
from common import describe_server, insert_jobs, percentile, servers
from psycopg.conninfo import make_conninfo

from neoq_anyio import Handler, Job, open_backend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests._pgbouncer import pgbouncer_path, pooled_database, start_pgbouncer

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

    from tests._pgbouncer import PgBouncer, PooledDatabase

QUEUE = "scale"
PROCESSES = (1, 2, 4, 8)
CONCURRENCY = {"lease": 50, "transaction": 4}
WAYS = ("direct", "pgbouncer", "pgbouncer+listen")
PENDING_CHECK = 5.0
LATENCY_SPACING = 0.02  # seconds between the latency phase's enqueues
SAMPLE_EVERY = 0.05  # seconds between looks at pg_stat_activity
READY_TIMEOUT = 60.0
DRAIN_TIMEOUT = 180.0  # seconds a run may take to process its jobs


@dataclass
class Result:
    execution: str
    way: str
    processes: int
    jobs_per_second: float
    server_peak: int
    client_peak: int
    claim_p50_ms: float
    claim_p99_ms: float


def backend_options(way: str, database: PooledDatabase) -> tuple[str, dict[str, Any]]:
    """The connection string and ``open_backend`` options of a way to the database."""
    if way == "direct":
        return database.direct_dsn, {}
    if way == "direct+pooler":
        return database.direct_dsn, {"pooler": "transaction"}
    options: dict[str, Any] = {"pooler": "transaction"}
    if way == "pgbouncer+listen":
        options["listen_connection_string"] = database.direct_dsn
    return database.dsn, options


# -- a worker process ------------------------------------------------------------------


def worker_process(
    dsn: str,
    options: dict[str, Any],
    execution: str,
    ready: Event,
    go: Event,
    stop: Event,
    results: Any,
) -> None:
    logging.basicConfig(level=logging.ERROR)
    try:
        outcome = anyio.run(_work, dsn, options, execution, ready, go, stop)
    except BaseException as exc:
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
        ready.set()
    results.put(outcome)


async def _work(
    dsn: str, options: dict[str, Any], execution: str, ready: Event, go: Event, stop: Event
) -> dict[str, Any]:
    latencies: list[float] = []
    clients = 0

    async def handle(job: Job) -> None:
        sent = (job.payload or {}).get("t")
        if sent is not None:
            latencies.append(time.time() - sent)

    async with open_backend(
        dsn, pending_job_check_interval=PENDING_CHECK, shutdown_timeout=5, **options
    ) as nq:
        ready.set()
        await anyio.to_thread.run_sync(go.wait)
        concurrency = CONCURRENCY[execution]
        await nq.start(Handler(QUEUE, handle, concurrency=concurrency, execution=execution))  # type: ignore[arg-type]
        listener = 0 if "pooler" in options and "listen_connection_string" not in options else 1
        async with anyio.create_task_group() as tg:

            async def sample() -> None:
                nonlocal clients
                while True:
                    clients = max(clients, nq.statistics().pool.size + listener)
                    await anyio.sleep(SAMPLE_EVERY)

            tg.start_soon(sample)
            await anyio.to_thread.run_sync(stop.wait)
            tg.cancel_scope.cancel()
    return {"latencies": latencies, "clients": clients}


# -- the coordinator -------------------------------------------------------------------


class ServerSampler:
    """Samples how many server sessions ``role`` has, in a thread."""

    def __init__(self, server_dsn: str, role: str) -> None:
        self._conn = psycopg.connect(server_dsn, autocommit=True)
        self._role = role
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ServerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        query = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE usename = %s AND backend_type = 'client backend'"
        )
        while not self._stop.is_set():
            row = self._conn.execute(query, (self._role,)).fetchone()
            self.samples.append(int(row[0]) if row else 0)
            self._stop.wait(SAMPLE_EVERY)


def wait_processed(
    dsn: str, count: int, timeout: float, workers: list[multiprocessing.process.BaseProcess]
) -> None:
    """Until ``count`` jobs are processed; raises if that takes longer than
    ``timeout`` seconds, or a worker process ended (it failed)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM neoq_jobs WHERE status = 'processed'"
            ).fetchone()
            done = int(row[0]) if row else 0
            if done >= count:
                return
            if not all(worker.is_alive() for worker in workers):
                raise RuntimeError(f"a worker process ended ({done} of {count} jobs processed)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {count} jobs processed in {timeout:g} s")
            time.sleep(0.01)


async def enqueue_spaced(dsn: str, options: dict[str, Any], count: int) -> None:
    async with open_backend(dsn, keep_processed=None, keep_dead=None, **options) as nq:
        for n in range(count):
            await nq.enqueue(Job(QUEUE, {"t": time.time(), "n": n}))
            await anyio.sleep(LATENCY_SPACING)


async def enqueue_rate(dsn: str, options: dict[str, Any], count: int) -> float:
    """Jobs per second, one ``enqueue()`` at a time, after a warm-up."""
    async with open_backend(dsn, keep_processed=None, keep_dead=None, **options) as nq:
        for n in range(100):
            await nq.enqueue(Job("warm-up", {"n": n}))
        started = time.perf_counter()
        for n in range(count):
            await nq.enqueue(Job("enqueue", {"n": n}))
        return count / (time.perf_counter() - started)


def measure_enqueue(bouncer: PgBouncer, way: str, count: int) -> float:
    with pooled_database(bouncer) as database:
        dsn, options = backend_options(way, database)
        return anyio.run(enqueue_rate, dsn, options, count)


@dataclass
class Plan:
    jobs: int
    latency_jobs: int
    server_dsn: str


def _outcome(results: Any) -> dict[str, Any]:
    """A worker's report, or what is known when none comes."""
    try:
        outcome: dict[str, Any] = results.get(timeout=60)
    except queue.Empty:
        return {"error": "no report"}
    return outcome


def measure(plan: Plan, bouncer: PgBouncer, execution: str, way: str, processes: int) -> Result:
    context = multiprocessing.get_context("spawn")
    with pooled_database(bouncer) as database:
        dsn, options = backend_options(way, database)

        async def migrate() -> None:
            async with open_backend(dsn, keep_processed=None, keep_dead=None, **options):
                pass

        anyio.run(migrate)
        # The bench's own look at the tables, as the server's superuser: not
        # counted among the role's sessions.
        own = make_conninfo(plan.server_dsn, options=f"-csearch_path={database.role}")
        insert_jobs(own, QUEUE, plan.jobs)
        ready = [context.Event() for _ in range(processes)]
        go, stop = context.Event(), context.Event()
        results = context.Queue()
        workers = [
            context.Process(
                target=worker_process,
                args=(dsn, options, execution, ready[i], go, stop, results),
                daemon=True,
            )
            for i in range(processes)
        ]
        for worker in workers:
            worker.start()
        try:
            for event in ready:
                if not event.wait(READY_TIMEOUT):
                    raise TimeoutError("a worker process did not start")
            with ServerSampler(plan.server_dsn, database.role) as sampler:
                started = time.perf_counter()
                go.set()
                wait_processed(own, plan.jobs, DRAIN_TIMEOUT, workers)
                elapsed = time.perf_counter() - started
            anyio.run(enqueue_spaced, dsn, options, plan.latency_jobs)
            wait_processed(own, plan.jobs + plan.latency_jobs, DRAIN_TIMEOUT, workers)
        except BaseException as exc:
            stop.set()
            details = [_outcome(results) for _ in workers]
            raise RuntimeError(f"{exc}; workers: {details}") from exc
        stop.set()
        outcomes = [_outcome(results) for _ in workers]
        for worker in workers:
            worker.join(30)
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise RuntimeError("; ".join(errors))
    latencies = [value for o in outcomes for value in o["latencies"]]
    return Result(
        execution,
        way,
        processes,
        plan.jobs / elapsed,
        max(sampler.samples, default=0),
        sum(o["clients"] for o in outcomes),
        percentile(latencies, 0.5) * 1000 if latencies else float("nan"),
        percentile(latencies, 0.99) * 1000 if latencies else float("nan"),
    )


def best_of(old: Result | None, new: Result) -> Result:
    """Each figure at its best over two runs of a configuration."""
    if old is None:
        return new
    return Result(
        new.execution,
        new.way,
        new.processes,
        max(old.jobs_per_second, new.jobs_per_second),
        max(old.server_peak, new.server_peak),
        max(old.client_peak, new.client_peak),
        min(old.claim_p50_ms, new.claim_p50_ms),
        min(old.claim_p99_ms, new.claim_p99_ms),
    )


def print_results(results: list[Result]) -> None:
    header = (
        f"{'execution':<12} {'way':<17} {'procs':>5} {'jobs/s':>8} "
        f"{'server conns':>12} {'client conns':>12} {'claim p50':>10} {'claim p99':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.execution:<12} {r.way:<17} {r.processes:>5} {r.jobs_per_second:>8.0f} "
            f"{r.server_peak:>12} {r.client_peak:>12} "
            f"{r.claim_p50_ms:>7.1f} ms {r.claim_p99_ms:>7.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="the server to measure (default: an embedded one)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer jobs")
    parser.add_argument("--jobs", type=int, help="backlog size (20,000; --quick 3,000)")
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--enqueue-jobs", type=int, default=2_000)
    parser.add_argument("--enqueue-only", action="store_true", help="only the enqueue figures")
    parser.add_argument("--pool-size", type=int, default=20, help="PgBouncer's server sessions")
    parser.add_argument("--rounds", type=int, default=2, help="runs per configuration (best kept)")
    parser.add_argument("--execution", choices=sorted(CONCURRENCY), action="append")
    parser.add_argument("--way", choices=WAYS, action="append")
    parser.add_argument("--processes", type=int, action="append")
    args = parser.parse_args()
    if pgbouncer_path() is None:
        sys.exit("scale_out.py needs pgbouncer: apt-get install pgbouncer")
    jobs = args.jobs or (3_000 if args.quick else 20_000)
    with (
        servers(args.dsn) as server_dsn,
        start_pgbouncer(server_dsn, pool_size=args.pool_size) as bouncer,
    ):
        print(describe_server(server_dsn))
        print(
            f"{jobs} jobs per run, {args.latency_jobs} for latency; PgBouncer "
            f"pool_size {args.pool_size}; concurrency per process: "
            + ", ".join(f"{k} {v}" for k, v in CONCURRENCY.items())
            + "\n",
            flush=True,
        )
        plan = Plan(jobs, args.latency_jobs, server_dsn)
        rates: dict[str, float] = {}
        for _ in range(args.rounds):
            for way in [*(args.way or WAYS), "direct+pooler"]:
                rate = measure_enqueue(bouncer, way, args.enqueue_jobs)
                rates[way] = max(rates.get(way, 0.0), rate)
        for way, rate in rates.items():
            print(f"enqueue, one per call, {way:<17} {rate:>8.0f} jobs/s", flush=True)
        print()
        if args.enqueue_only:
            return
        configurations = [
            (execution, way, processes)
            for execution in args.execution or ("lease", "transaction")
            for way in args.way or WAYS
            for processes in args.processes or PROCESSES
        ]
        best: dict[tuple[str, str, int], Result] = {}
        for _ in range(args.rounds):
            for key in configurations:
                try:
                    result = measure(plan, bouncer, *key)
                except Exception as exc:  # a failed run leaves a hole, not a dead bench
                    print(f"{' '.join(map(str, key))}: failed: {exc}", file=sys.stderr, flush=True)
                    continue
                print_results([result])
                sys.stdout.flush()
                best[key] = best_of(best.get(key), result)
        results = [best[key] for key in configurations if key in best]
    print()
    print_results(results)
    by_key = {(r.execution, r.way, r.processes): r.jobs_per_second for r in results}
    for execution in args.execution or ("lease", "transaction"):
        for way in args.way or WAYS:
            one = by_key.get((execution, way, 1))
            most = max((by_key.get((execution, way, n), 0.0) for n in PROCESSES), default=0.0)
            if one:
                print(f"{execution:<12} {way:<17} best speed-up over 1 process: {most / one:.2f}x")


if __name__ == "__main__":
    main()
