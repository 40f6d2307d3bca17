"""Periodic jobs: start_cron on PostgreSQL, once per tick across backends, and the ticker."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from neoq_anyio import ConfigurationError, Handler, Job
from neoq_anyio._cron import WallClock

from .conftest import Database
from .test_processing import backend


class SkewedClock(WallClock):
    def __init__(self, skew: float) -> None:
        self.skew = timedelta(seconds=skew)

    def now(self) -> datetime:
        return super().now() + self.skew


def tick_of(job: Job) -> str:
    assert job.payload is not None
    return str(job.payload["tick"])


async def test_every_second_fires_on_whole_seconds(dsn: str) -> None:
    ticks: list[str] = []
    two = anyio.Event()

    async def handle(job: Job) -> None:
        ticks.append(tick_of(job))
        if len(ticks) == 2:
            two.set()

    async with backend(dsn) as nq:
        started = await nq.start_cron("* * * * * *", Handler("", handle))
        assert started.queue == "every_second"
        with anyio.fail_after(10):
            await two.wait()
    first, second = (datetime.fromisoformat(t) for t in ticks[:2])
    assert first.microsecond == 0
    assert second - first == timedelta(seconds=1)


async def test_named_queue_is_kept(dsn: str) -> None:
    async with backend(dsn) as nq:
        started = await nq.start_cron("@hourly", Handler("reports", Recorder()))
    assert started.queue == "reports"


class Recorder:
    def __init__(self) -> None:
        self.jobs: list[Job] = []

    async def __call__(self, job: Job) -> None:
        self.jobs.append(job)


@pytest.mark.parametrize("spec", ["* * * *", "61 * * * *", "@often", "@every 500ms", ""])
async def test_malformed_spec_schedules_nothing(dsn: str, db: Database, spec: str) -> None:
    async with backend(dsn) as nq:
        with pytest.raises(ConfigurationError, match=r"spec|cron|every|field|empty"):
            await nq.start_cron(spec, Handler("", Recorder()))
        assert nq.statistics().queues == ()
    assert await db.value("SELECT count(*) FROM neoq_jobs") == 0


async def test_each_tick_runs_once_across_backends_with_skewed_clocks(
    dsn: str, db: Database
) -> None:
    runs: Counter[str] = Counter()
    enough = anyio.Event()

    async def handle(job: Job) -> None:
        runs[tick_of(job)] += 1
        if len(runs) >= 3:
            enough.set()

    async def one_backend(skew: float) -> None:
        async with backend(dsn + " pool_max_conns=2") as nq:
            # Clocks that differ by up to a second still agree on the ticks.
            nq._cron_clock = SkewedClock(skew)
            await nq.start_cron("* * * * * *", Handler("", handle, concurrency=2))
            await enough.wait()
            await anyio.sleep(1.2)  # let every backend reach the last tick too

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for skew in (-0.5, 0.0, 0.3, 0.5):
                tg.start_soon(one_backend, skew)
    assert len(runs) >= 3
    assert set(runs.values()) == {1}, runs
    per_tick = await db.fetch(
        "SELECT payload->>'tick', count(*) FROM neoq_jobs GROUP BY 1 HAVING count(*) > 1"
    )
    assert per_tick == []


async def test_late_process_does_not_enqueue_a_finished_tick(dsn: str, db: Database) -> None:
    ran = anyio.Event()

    async def handle(job: Job) -> None:
        ran.set()

    tick = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=30)
    async with backend(dsn) as first:
        await first.start(Handler("late", handle))
        assert await first._enqueue_tick("late", tick) is True
        await db.execute("UPDATE neoq_jobs SET run_after = now()")  # run it now
        await db.execute("NOTIFY late, '0'")
        with anyio.fail_after(10):
            await ran.wait()
        await db.wait_for("SELECT status FROM neoq_jobs", lambda s: s == "processed")
    # A second process reaches the same tick after the job completed.
    async with backend(dsn) as second:
        assert await second._enqueue_tick("late", tick) is False
    assert await db.value("SELECT count(*) FROM neoq_jobs") == 1


async def test_old_claims_are_pruned(dsn: str, db: Database) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    async with backend(dsn) as nq:
        assert await nq._enqueue_tick("prune", now - timedelta(days=3))
        assert await nq._enqueue_tick("prune", now)
    ticks = await db.fetch("SELECT tick FROM neoq_anyio_cron_ticks ORDER BY tick")
    assert [t[0] for t in ticks] == [now]
