"""Behaviour both backends share, tested once against each (PostgreSQL, in memory).

Only the public API and ``neoq_anyio.testing`` are used here, so what passes
for one backend passes for the other: handlers move between them unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import anyio
import pytest

from neoq_anyio import (
    Backend,
    DuplicateJobError,
    Handler,
    Job,
    JobTimeoutError,
    NoQueueError,
    NoTransactionError,
    current_job,
    current_transaction,
    open_backend,
)
from neoq_anyio.testing import dead_jobs, drain, enqueued, fast_forward

from .test_processing import FAST


@asynccontextmanager
async def opened(connection_string: str, **options: Any) -> AsyncIterator[Backend]:
    async with open_backend(connection_string, **{**FAST, **options}) as nq:
        yield nq


async def test_job_runs_once_with_its_payload(connection_string: str | None) -> None:
    seen: list[Job] = []
    async with opened(connection_string) as nq:
        assert isinstance(nq, Backend)
        await nq.start(Handler("emails", _record(seen)))
        job_id = await nq.enqueue(Job("emails", {"to": "ada@example.com", "n": [1, 2]}))
        await drain(nq)
        [stored] = await enqueued(nq, "emails")
    assert [j.id for j in seen] == [job_id]
    assert seen[0].payload == {"to": "ada@example.com", "n": [1, 2]}
    assert seen[0].status == "new"
    assert stored.status == "processed"
    assert stored.ran_at is not None
    assert stored.error is None


async def test_enqueue_before_start_runs_at_start(connection_string: str | None) -> None:
    seen: list[Job] = []
    async with opened(connection_string) as nq:
        for n in range(3):
            await nq.enqueue(Job("later", {"n": n}))
        await nq.start(Handler("later", _record(seen)))
        with anyio.fail_after(10):
            while len(seen) < 3:
                await drain(nq)
    assert sorted(j.payload["n"] for j in seen if j.payload) == [0, 1, 2]


async def test_bad_jobs_are_refused(connection_string: str | None) -> None:
    async with opened(connection_string) as nq:
        with pytest.raises(NoQueueError):
            await nq.enqueue(Job(""))
        await nq.enqueue(Job("q", {"a": 1}))
        with pytest.raises(DuplicateJobError):
            await nq.enqueue(Job("q", {"a": 1}))
        assert len(await enqueued(nq)) == 1


async def test_failure_retry_and_dead_job(connection_string: str | None) -> None:
    runs: list[int] = []

    async def flaky(job: Job) -> None:
        runs.append(job.retries)
        raise ValueError(f"attempt {job.retries}")

    async with opened(connection_string) as nq:
        await nq.start(Handler("flaky", flaky))
        await nq.enqueue(Job("flaky", max_retries=1))
        await drain(nq)
        [job] = await enqueued(nq, "flaky")
        assert (job.status, job.retries, job.error) == ("failed", 0, "ValueError: attempt 0")
        assert runs == [0]
        await fast_forward(nq, 60)  # past backoff(0) = 16 s + jitter
        with anyio.fail_after(10):
            while not await dead_jobs(nq):
                await drain(nq)
        [dead] = await dead_jobs(nq)
        assert (dead.retries, dead.error) == (1, "ValueError: attempt 1")
        assert await enqueued(nq, "flaky") == []
    assert runs == [0, 1]


async def test_job_timeout(connection_string: str | None) -> None:
    failures: list[BaseException] = []

    async def stuck(job: Job) -> None:
        await anyio.sleep_forever()

    async with opened(connection_string) as nq:
        await nq.start(
            Handler("stuck", stuck, job_timeout=0.2, recover_callback=_collect(failures))
        )
        await nq.enqueue(Job("stuck"))
        with anyio.fail_after(10):
            while not failures:
                await drain(nq)
        [job] = await enqueued(nq, "stuck")
    assert isinstance(failures[0], JobTimeoutError)
    assert job.status == "failed"
    assert (job.error or "").startswith("JobTimeoutError")


async def test_future_job_waits_for_its_time(connection_string: str | None) -> None:
    seen: list[Job] = []
    async with opened(connection_string) as nq:
        await nq.start(Handler("future", _record(seen)))
        await nq.enqueue(Job("future", run_after=_in(hours=2)))
        await drain(nq)
        assert seen == []
        await fast_forward(nq, timedelta(hours=2, seconds=1))
        with anyio.fail_after(10):
            while not seen:
                await drain(nq)


async def test_past_deadline_is_not_run(connection_string: str | None) -> None:
    seen: list[Job] = []
    async with opened(connection_string) as nq:
        await nq.enqueue(Job("late", deadline=_in(seconds=-1)))
        await nq.start(Handler("late", _record(seen)))
        with anyio.fail_after(10):
            while not await dead_jobs(nq):
                await drain(nq)
        [dead] = await dead_jobs(nq)
    assert seen == []
    assert (dead.error or "").startswith("JobDeadlineError")


async def test_context_of_a_running_job(connection_string: str | None, backend_kind: str) -> None:
    outcome: dict[str, Any] = {}

    async def handle(job: Job) -> None:
        outcome["job"] = current_job().id
        try:
            outcome["tx"] = type(current_transaction()).__name__
        except NoTransactionError:
            outcome["tx"] = None

    async with opened(connection_string) as nq:
        await nq.start(Handler("ctx", handle))
        job_id = await nq.enqueue(Job("ctx"))
        await drain(nq)
    assert outcome["job"] == job_id
    assert outcome["tx"] == ("AnyioConnection" if backend_kind == "postgres" else None)


async def test_shutdown_timeout_leaves_the_job_queued(connection_string: str | None) -> None:
    started = anyio.Event()

    async def stuck(job: Job) -> None:
        started.set()
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with opened(connection_string, shutdown_timeout=0.1) as nq:
            await nq.start(Handler("stuck", stuck))
            await nq.enqueue(Job("stuck"))
            await started.wait()
        [job] = await enqueued(nq, "stuck")
    assert (job.status, job.retries, job.error) == ("new", 0, None)


async def test_cron_ticks_run_the_handler(connection_string: str | None) -> None:
    seen: list[Job] = []
    async with opened(connection_string) as nq:
        handler = await nq.start_cron("* * * * * *", Handler("", _record(seen)))
        assert handler.queue == "every_second"
        with anyio.fail_after(10):
            while len(seen) < 2:
                await fast_forward(nq, 1)
                await drain(nq)
                await anyio.sleep(0.05)
    ticks = [j.payload["tick"] for j in seen if j.payload]
    assert len(set(ticks)) == len(ticks)


async def test_concurrency_is_bounded(connection_string: str | None) -> None:
    running = peak = 0
    release = anyio.Event()
    four = anyio.Event()

    async def handle(job: Job) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 4:
            four.set()
        await release.wait()
        running -= 1

    async with opened(connection_string) as nq:
        for n in range(10):
            await nq.enqueue(Job("wide", {"n": n}))
        await nq.start(Handler("wide", handle, concurrency=4))
        with anyio.fail_after(10):
            await four.wait()
        assert nq.statistics().jobs_in_flight == 4
        release.set()
        await drain(nq)
    assert peak == 4


def _record(seen: list[Job]) -> Any:
    async def handle(job: Job) -> None:
        seen.append(job)

    return handle


def _collect(failures: list[BaseException]) -> Any:
    def callback(job: Job, exc: BaseException) -> None:
        failures.append(exc)

    return callback


def _in(**delta: float) -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC) + timedelta(**delta)


async def test_cancelling_the_block_still_gives_jobs_their_grace(
    connection_string: str | None,
) -> None:
    started = anyio.Event()
    finished: list[str] = []

    async def slow(job: Job) -> None:
        started.set()
        await anyio.sleep(0.3)
        finished.append(job.id or "")

    with anyio.fail_after(10):
        with anyio.CancelScope() as outer:
            async with opened(connection_string, shutdown_timeout=5) as nq:
                await nq.start(Handler("slow", slow))
                job_id = await nq.enqueue(Job("slow"))
                await started.wait()
                outer.cancel()  # e.g. Ctrl-C or a failing sibling task
                await anyio.sleep_forever()
        assert outer.cancelled_caught
    assert finished == [job_id]
    [job] = await enqueued(nq, "slow")
    assert job.status == "processed"
