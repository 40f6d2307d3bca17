"""Job priorities: among a queue's due jobs, higher priority first, then
older ``run_after``; on both backends and in both execution modes. The claim
stays index-driven: the plan reads the ready index in claim order, no sort."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from neoq_anyio import Handler, InvalidJobError, Job, open_backend

from .conftest import Database
from .test_processing import FAST


@pytest.mark.parametrize("execution", ["transaction", "lease"])
async def test_higher_priority_runs_first(connection_string: str, execution: Any) -> None:
    order: list[str] = []
    done = anyio.Event()

    async def record(job: Job) -> None:
        assert job.payload is not None
        order.append(job.payload["name"])
        if len(order) == 5:
            done.set()

    now = datetime.now(UTC)
    async with open_backend(connection_string, **FAST) as nq:
        # All due before a worker starts: the order is the claim order.
        for name, priority, age in [
            ("low", -5, 4),
            ("old", 0, 3),
            ("young", 0, 1),
            ("urgent", 10, 0),
            ("high", 5, 2),
        ]:
            await nq.enqueue(
                Job("p", {"name": name}, priority=priority, run_after=now - timedelta(minutes=age))
            )
        await nq.start(Handler("p", record, concurrency=1, execution=execution))
        with anyio.fail_after(10):
            await done.wait()
    assert order == ["urgent", "high", "old", "young", "low"]


@pytest.mark.parametrize("execution", ["transaction", "lease"])
async def test_an_urgent_job_overtakes_a_draining_backlog(
    connection_string: str, execution: Any
) -> None:
    """Behind the claims' watermark, a higher priority is still taken first."""
    seen: list[Any] = []
    started = anyio.Event()
    release = anyio.Event()
    urgent_done = anyio.Event()

    async def work(job: Job) -> None:
        assert job.payload is not None
        seen.append(job.payload["n"])
        started.set()
        if job.payload["n"] == "urgent":
            urgent_done.set()
        await release.wait()

    async with open_backend(connection_string, **FAST) as nq:
        await nq.enqueue_many([Job("b", {"n": n}) for n in range(50)])
        await nq.start(Handler("b", work, concurrency=1, execution=execution))
        with anyio.fail_after(10):
            await started.wait()  # job 0 runs: the backlog of 49 waits behind it
        await nq.enqueue(Job("b", {"n": "urgent"}, priority=1))
        release.set()
        with anyio.fail_after(10):
            await urgent_done.wait()
    assert seen[:2] == [0, "urgent"]


async def test_priority_survives_dead_and_retry(dsn: str, db: Database) -> None:
    async def fail(job: Job) -> None:
        raise RuntimeError("no")

    async with open_backend(dsn, **FAST) as nq:
        await nq.start(Handler("d", fail))
        job_id = await nq.enqueue(Job("d", priority=7, max_retries=0))
        await db.wait_for(f"SELECT count(*) FROM neoq_dead_jobs WHERE id = {int(job_id)}", bool)
        dead = await nq.get_job(job_id)
        assert dead is not None
        assert (dead.status, dead.priority) == ("dead", 7)
    async with open_backend(dsn, **FAST) as nq:
        back = await nq.retry_job(job_id)
        assert back.priority == 7
    assert await db.value(f"SELECT priority FROM neoq_jobs WHERE id = {int(job_id)}") == 7


@pytest.mark.parametrize("priority", [2**15, -(2**15) - 1, 1.5, True, "1"])
async def test_priority_out_of_range_is_refused(connection_string: str, priority: Any) -> None:
    async with open_backend(connection_string, **FAST) as nq:
        with pytest.raises(InvalidJobError, match="priority"):
            await nq.enqueue(Job("q", priority=priority))
        with pytest.raises(InvalidJobError, match="priority"):
            await nq.enqueue_many([Job("q", {"n": 1}), Job("q", priority=priority)])
        assert await nq.list_jobs() == []


async def test_claims_read_the_ready_index_in_order(dsn: str, db: Database) -> None:
    async with open_backend(dsn, **FAST) as nq:
        await nq.enqueue_many([Job("i", {"n": n}, priority=n % 3) for n in range(2000)])
    await db.execute("ANALYZE neoq_jobs")
    plan = "\n".join(
        row[0]
        for row in await db.fetch(
            "EXPLAIN SELECT id FROM neoq_jobs WHERE queue = 'i' AND status <> 'processed' "
            "AND lease_token IS NULL AND run_after <= now() "
            "ORDER BY -priority::integer, run_after, id LIMIT 10 FOR UPDATE SKIP LOCKED"
        )
    )
    assert "neoq_anyio_jobs_ready_idx" in plan
    assert "Sort" not in plan
