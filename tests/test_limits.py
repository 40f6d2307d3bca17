"""Global limits of lease-mode queues across processes (here: several
backends on one database): ``global_concurrency`` and ``rate_limit``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from typing import Any

import anyio
import pytest

from neoq_anyio import ConfigurationError, Handler, Job, open_backend

from .conftest import Database
from .test_processing import FAST, backend

LEASE = 30.0  # seconds: no heartbeat moves a lease's expiry during these tests


class Gauge:
    """Jobs running at once across the backends of a test, and the peak."""

    def __init__(self, expected: int, seconds: float) -> None:
        self.running = 0
        self.peak = 0
        self.done = 0
        self.expected = expected
        self.seconds = seconds
        self.finished = anyio.Event()

    async def __call__(self, job: Job) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await anyio.sleep(self.seconds)
        self.running -= 1
        self.done += 1
        if self.done == self.expected:
            self.finished.set()


async def test_global_concurrency_holds_across_backends(dsn: str) -> None:
    jobs, limit, seconds = 30, 3, 0.1
    gauge = Gauge(jobs, seconds)
    async with backend(dsn) as a, backend(dsn) as b, backend(dsn) as c:
        for nq in (a, b, c):
            await nq.start(
                Handler(
                    "limited",
                    gauge,
                    concurrency=5,
                    execution="lease",
                    global_concurrency=limit,
                    lease_duration=LEASE,
                )
            )
        await a.enqueue_many([Job("limited", {"n": n}) for n in range(jobs)])
        started = anyio.current_time()
        with anyio.fail_after(20):
            await gauge.finished.wait()
        took = anyio.current_time() - started
    assert gauge.peak == limit  # reached, never passed
    # At the limit, not far below it: 10 rounds of 0.1 s, plus claims and polls.
    assert took < jobs / limit * seconds * 3


async def test_rate_limit_holds_across_backends(dsn: str, db: Database) -> None:
    jobs, starts, per = 24, 8, 1.0
    claimed_at: list[float] = []
    done = anyio.Event()

    async def record(job: Job) -> None:
        # The claim's time on the database's clock: the lease's expiry less its length.
        expiry = await db.value(
            "SELECT extract(epoch FROM lease_expires_at)::float8 FROM neoq_jobs WHERE id = %s",
            (int(job.id or 0),),
        )
        claimed_at.append(expiry - LEASE)
        if len(claimed_at) == jobs:
            done.set()

    async with backend(dsn) as a, backend(dsn) as b:
        for nq in (a, b):
            await nq.start(
                Handler(
                    "rated",
                    record,
                    concurrency=10,
                    execution="lease",
                    rate_limit=(starts, per),
                    lease_duration=LEASE,
                )
            )
        await a.enqueue_many([Job("rated", {"n": n}) for n in range(jobs)])
        with anyio.fail_after(20):
            await done.wait()
    windows = Counter(int(at // per) for at in claimed_at)
    assert max(windows.values()) <= starts
    # At the limit: 24 starts at 8 per window fill 3 windows, 4 at most.
    assert len(windows) <= 4


async def test_a_lost_workers_slot_frees_itself_when_its_lease_expires(
    dsn: str, db: Database
) -> None:
    gauge = Gauge(1, 0)
    async with backend(dsn) as nq:
        handler = Handler(
            "orphaned", gauge, execution="lease", global_concurrency=1, lease_duration=1
        )
        job_id = await nq.enqueue(Job("orphaned"))
        # A worker elsewhere holds the one slot for this job, and died.
        await db.execute(
            "UPDATE neoq_jobs SET lease_token = 7, lease_expires_at = now() + interval '0.5 s' "
            f"WHERE id = {int(job_id)}"
        )
        await db.execute(
            "INSERT INTO neoq_anyio_slots (queue, slot, job_id, lease_token, expires_at) "
            f"VALUES ('orphaned', 0, {int(job_id)}, 7, now() + interval '0.5 s')"
        )
        await nq.start(handler)
        with anyio.fail_after(10):
            await gauge.finished.wait()
    assert gauge.done == 1


@pytest.mark.parametrize(
    "limits", [{"global_concurrency": 2}, {"rate_limit": (1, 1)}], ids=["concurrency", "rate"]
)
async def test_limits_need_lease_mode(limits: dict[str, Any]) -> None:
    async def handle(job: Job) -> None:
        pass

    with pytest.raises(ConfigurationError, match="lease mode"):
        Handler("q", handle, **limits)


async def test_memory_backend_bounds_concurrency_and_refuses_rate_limits() -> None:
    gauge = Gauge(6, 0.01)
    async with open_backend(**FAST) as nq:
        await nq.start(Handler("m", gauge, concurrency=5, execution="lease", global_concurrency=2))
        for n in range(6):
            await nq.enqueue(Job("m", {"n": n}))
        with anyio.fail_after(10):
            await gauge.finished.wait()
        with pytest.raises(ConfigurationError, match="rate_limit"):
            await nq.start(Handler("r", gauge, execution="lease", rate_limit=(1, 1)))
    assert gauge.peak == 2


CHILD = """
import os, anyio
from neoq_anyio import Handler, current_transaction, open_backend

async def work(job):
    tx = current_transaction()
    await tx.execute("INSERT INTO runs VALUES (%s, clock_timestamp(), NULL)", (int(job.id),))
    await anyio.sleep(0.2)
    await tx.execute("UPDATE runs SET ended = clock_timestamp() WHERE job = %s", (int(job.id),))

async def main():
    async with open_backend(os.environ["NEOQ_CHILD_DSN"], job_check_interval=0.05) as nq:
        await nq.start(Handler("fleet", work, concurrency=4, execution="lease",
                               global_concurrency=2))
        await anyio.sleep_forever()

anyio.run(main, backend=os.environ["NEOQ_CHILD_LOOP"])
"""


async def test_global_concurrency_holds_across_processes(
    dsn: str, db: Database, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    jobs = 12
    async with backend(dsn) as nq:  # the schema, the table, the jobs
        async with nq.connection() as conn:
            await conn.execute(
                "CREATE TABLE runs (job bigint, started timestamptz, ended timestamptz)"
            )
        await nq.enqueue_many([Job("fleet", {"n": n}) for n in range(jobs)])
    env = {**os.environ, "NEOQ_CHILD_DSN": dsn, "NEOQ_CHILD_LOOP": anyio_backend[0]}
    children = [
        await anyio.open_process(
            [sys.executable, "-c", CHILD],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        await db.wait_for(
            "SELECT count(*) FROM runs WHERE ended IS NOT NULL",
            lambda n: n == jobs,
            timeout=30,
        )
    finally:
        for child in children:
            child.terminate()
        with anyio.move_on_after(10, shield=True):
            for child in children:
                await child.wait()
    # The most runs in progress at once, from the database's own clock.
    peak = await db.value(
        "SELECT max(c) FROM (SELECT (SELECT count(*) FROM runs AS o "
        "WHERE o.started <= r.started AND o.ended > r.started) AS c FROM runs AS r) AS at_starts"
    )
    assert peak == 2
