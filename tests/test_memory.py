"""The in-memory backend's own behaviour, and testing with fake time.

These tests touch no database, so besides asyncio and trio they also run on
trio with ``MockClock(autojump_threshold=0)``: time jumps whenever every task
waits, and hours of backoff pass in no real time.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from neoq_anyio import (
    Handler,
    Job,
    MemoryBackend,
    NoTransactionError,
    open_backend,
)
from neoq_anyio.testing import dead_jobs, drain, enqueued, fast_forward


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
        pytest.param(("trio", {"autojump": True}), id="trio+autojump"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    name, options = request.param
    if options.get("autojump"):
        import trio.testing

        options = {"clock": trio.testing.MockClock(autojump_threshold=0)}
    return name, options


def autojumping(anyio_backend: tuple[str, dict[str, Any]]) -> bool:
    return "clock" in anyio_backend[1]


async def test_memory_is_the_default_backend() -> None:
    for connection_string in ((), ("memory://",)):
        async with open_backend(*connection_string) as nq:
            assert isinstance(nq, MemoryBackend)
            assert nq.statistics().pool is None


async def test_there_is_no_database() -> None:
    async with open_backend() as nq:
        with pytest.raises(NoTransactionError):
            async with nq.connection():
                pass
        with pytest.raises(NoTransactionError):
            await nq.enqueue(Job("q"), connection=object())  # type: ignore[arg-type]
        assert await enqueued(nq) == []


async def test_retries_come_due_with_fake_time(anyio_backend: tuple[str, dict[str, Any]]) -> None:
    attempts: list[datetime] = []
    succeeded = anyio.Event()

    async def flaky(job: Job) -> None:
        attempts.append(datetime.now(UTC))
        if job.retries < 3:
            raise RuntimeError("not yet")
        succeeded.set()

    with anyio.fail_after(10_000 if autojumping(anyio_backend) else 10):
        async with open_backend() as nq:
            await nq.start(Handler("flaky", flaky))
            await nq.enqueue(Job("flaky"))
            if autojumping(anyio_backend):
                await succeeded.wait()  # backoff passes in virtual time
            else:
                while not succeeded.is_set():
                    await drain(nq)
                    await fast_forward(nq, 200)  # backoff(2) is at most 16+58+1 s
            [job] = await enqueued(nq, "flaky")
    assert (job.status, job.retries) == ("processed", 3)
    assert len(attempts) == 4
    # Real time barely moved: the waits were fake.
    assert attempts[-1] - attempts[0] < timedelta(seconds=5)


async def test_future_job_runs_at_its_virtual_time(
    anyio_backend: tuple[str, dict[str, Any]],
) -> None:
    ran_at: list[float] = []

    async def handle(job: Job) -> None:
        ran_at.append(anyio.current_time())

    async with open_backend() as nq:
        assert isinstance(nq, MemoryBackend)
        await nq.start(Handler("later", handle))
        start = anyio.current_time()
        run_after = nq.clock.now() + timedelta(hours=1)
        await nq.enqueue(Job("later", run_after=run_after))
        await drain(nq)
        assert ran_at == []
        if autojumping(anyio_backend):
            await anyio.sleep(3601)  # an hour of virtual time, instantly
        else:
            await fast_forward(nq, 3601)
        await drain(nq)
    assert len(ran_at) == 1
    if autojumping(anyio_backend):
        assert ran_at[0] - start >= 3600


async def test_cron_with_fake_time(anyio_backend: tuple[str, dict[str, Any]]) -> None:
    ticks: list[str] = []
    three = anyio.Event()

    async def handle(job: Job) -> None:
        ticks.append((job.payload or {})["tick"])
        if len(ticks) == 3:
            three.set()

    with anyio.fail_after(100_000 if autojumping(anyio_backend) else 10):
        async with open_backend() as nq:
            handler = await nq.start_cron("@hourly", Handler("", handle))
            assert handler.queue == "at_0_minutes_past_the_hour"
            while not three.is_set():
                if autojumping(anyio_backend):
                    await three.wait()
                else:
                    await fast_forward(nq, 3600)
                    await drain(nq)
                    await anyio.sleep(0.01)  # let the ticker enqueue
    hours = [datetime.fromisoformat(t) for t in ticks]
    assert [b - a for a, b in itertools.pairwise(hours)] == [timedelta(hours=1)] * 2
    assert all(t.minute == 0 and t.second == 0 for t in hours)


async def test_max_queue_capacity_makes_enqueue_wait() -> None:
    release = anyio.Event()
    enqueued_ids: list[str] = []

    async def handle(job: Job) -> None:
        await release.wait()

    async with open_backend() as nq:
        await nq.start(Handler("small", handle, concurrency=1, max_queue_capacity=2))
        await nq.enqueue(Job("small", {"n": 0}))
        await nq.enqueue(Job("small", {"n": 1}))

        async def third() -> None:
            enqueued_ids.append(await nq.enqueue(Job("small", {"n": 2})))

        async with anyio.create_task_group() as tg:
            tg.start_soon(third)
            await anyio.wait_all_tasks_blocked()
            assert enqueued_ids == []  # waiting: two unprocessed jobs fill the queue
            release.set()
        assert len(enqueued_ids) == 1
        await drain(nq)
        assert [j.status for j in await enqueued(nq, "small")] == ["processed"] * 3


async def test_deadline_and_dead_jobs_in_memory() -> None:
    async def boom(job: Job) -> None:
        raise KeyError("x")

    async with open_backend() as nq:
        await nq.start(Handler("boom", boom))
        await nq.enqueue(Job("boom", {"a": 1}, max_retries=0))
        await drain(nq)
        [dead] = await dead_jobs(nq, "boom")
    assert (dead.status, dead.retries, dead.error) == ("dead", 0, "KeyError: 'x'")
    assert dead.payload == {"a": 1}


async def test_payload_is_a_json_copy() -> None:
    seen: list[Job] = []

    async def handle(job: Job) -> None:
        seen.append(job)

    payload: dict[str, Any] = {"t": (1, 2), "nested": {"k": "v"}}
    async with open_backend() as nq:
        await nq.start(Handler("copy", handle))
        await nq.enqueue(Job("copy", payload))
        payload["nested"]["k"] = "changed after enqueue"
        await drain(nq)
    assert seen[0].payload == {"t": [1, 2], "nested": {"k": "v"}}
