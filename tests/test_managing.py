"""The management API and retention, tested once against each backend.

``get_job``, ``list_jobs``, ``retry_job``, ``cancel_job``, ``delete_job``,
``queue_stats``, and the pruning of old processed and dead jobs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

from neoq_anyio import (
    Backend,
    ConfigurationError,
    DuplicateJobError,
    Handler,
    Job,
    NoJobError,
    QueueStats,
)
from neoq_anyio.testing import drain, fast_forward

from .test_backends import opened


async def fail(job: Job) -> None:
    raise KeyError("boom")


async def noop(job: Job) -> None:
    pass


async def dead_job(
    nq: Backend, queue: str = "doomed", payload: dict[str, int] | None = None
) -> str:
    """A job on ``queue`` that failed with no retries left: now dead."""
    await nq.start(Handler(queue, fail))
    job_id = await nq.enqueue(Job(queue, payload or {"n": 1}, max_retries=0))
    await drain(nq)
    return job_id


async def test_get_job_finds_live_and_dead_jobs(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        dead_id = await dead_job(nq)
        live_id = await nq.enqueue(Job("later", {"x": 1}, run_after=_in(3600)))
        live = await nq.get_job(live_id)
        dead = await nq.get_job(dead_id)
        assert live is not None
        assert (live.id, live.queue, live.status, live.payload) == (
            live_id,
            "later",
            "new",
            {"x": 1},
        )
        assert dead is not None
        assert (dead.id, dead.status, dead.retries) == (dead_id, "dead", 0)
        assert dead.error == "KeyError: 'boom'"
        for unknown in ("999999", "nope", "", "-1", "1" * 30):
            assert await nq.get_job(unknown) is None


async def test_list_jobs_newest_first_with_filters_and_paging(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        dead_id = await dead_job(nq)
        ids = [await nq.enqueue(Job("q", {"n": n}, run_after=_in(3600))) for n in range(5)]
        everything = await nq.list_jobs()
        assert [job.id for job in everything] == [*reversed(ids), dead_id]
        assert [job.id for job in await nq.list_jobs(status="dead")] == [dead_id]
        assert [job.id for job in await nq.list_jobs(queue="doomed")] == [dead_id]
        assert await nq.list_jobs(queue="q", status="processed") == []
        first = await nq.list_jobs(queue="q", limit=2)
        second = await nq.list_jobs(queue="q", limit=2, before_id=first[-1].id)
        third = await nq.list_jobs(queue="q", limit=2, before_id=second[-1].id)
        assert [j.id for j in first + second + third] == list(reversed(ids))
        for bad in ({"status": "sleeping"}, {"limit": 0}, {"limit": 10_001}, {"before_id": "x"}):
            with pytest.raises(ConfigurationError):
                await nq.list_jobs(**bad)  # type: ignore[arg-type]


async def test_retry_brings_a_dead_job_back_with_its_id(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        dead_id = await dead_job(nq, "flaky")
        ran = anyio.Event()

        async def now_works(job: Job) -> None:
            ran.set()

        await nq.start(Handler("flaky2", noop))  # another queue: the retried job is flaky's
        retried = await nq.retry_job(dead_id)
        assert (retried.id, retried.status, retried.queue) == (dead_id, "new", "flaky")
        assert retried.run_after is not None
        assert retried.run_after <= datetime.now(UTC) + timedelta(seconds=1)
        # The queue's handler still fails, and the job had no retries left: one
        # more run, then dead again, keeping its id.
        await drain(nq)
        job = await nq.get_job(dead_id)
        assert job is not None
        assert job.status == "dead"
        assert [j.id for j in await nq.list_jobs(status="dead")] == [dead_id]


async def test_retry_runs_a_dead_job_and_announces_it(connection_string: str) -> None:
    # Long poll intervals: the retried job must be found through its announcement.
    async with opened(
        connection_string, pending_job_check_interval=60, job_check_interval=60
    ) as nq:
        results: list[str] = []
        done = anyio.Event()

        async def flaky(job: Job) -> None:
            results.append(job.id or "")
            if len(results) == 1:
                raise KeyError("first run fails")
            done.set()

        await nq.start(Handler("flaky", flaky))
        job_id = await nq.enqueue(Job("flaky", {}, max_retries=0))
        await _wait_status(nq, job_id, "dead")
        await nq.retry_job(job_id)
        with anyio.fail_after(10):
            await done.wait()
        await _wait_status(nq, job_id, "processed")
        assert results == [job_id, job_id]


async def test_retry_makes_a_waiting_job_due_now(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        runs: list[int] = []
        done = anyio.Event()

        async def fails_once(job: Job) -> None:
            runs.append(job.retries)
            if len(runs) == 1:
                raise KeyError("once")
            done.set()

        await nq.start(Handler("wait", fails_once))
        job_id = await nq.enqueue(Job("wait", {}))
        await _wait_status(nq, job_id, "failed")  # now waiting about 16 s for its retry
        retried = await nq.retry_job(job_id)
        assert retried.status == "failed"
        with anyio.fail_after(10):
            await done.wait()
        assert runs == [0, 1]  # the early run counts as the retry it replaces


async def test_retry_refuses_unknown_ids_and_duplicates(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        dead_id = await dead_job(nq, "dup", {"same": 1})
        await nq.enqueue(Job("dup", {"same": 1}, run_after=_in(3600)))  # its twin, queued
        with pytest.raises(DuplicateJobError):
            await nq.retry_job(dead_id)
        job = await nq.get_job(dead_id)
        assert job is not None
        assert job.status == "dead"  # nothing changed
        for unknown in ("999999", "nope"):
            with pytest.raises(NoJobError):
                await nq.retry_job(unknown)


async def test_retry_runs_a_processed_job_again(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        runs: list[str] = []

        async def count(job: Job) -> None:
            runs.append(job.id or "")

        await nq.start(Handler("again", count))
        job_id = await nq.enqueue(Job("again", {}))
        await drain(nq)
        assert (await nq.retry_job(job_id)).status == "new"
        await drain(nq)
        assert runs == [job_id, job_id]


async def test_cancel_moves_an_unprocessed_job_to_the_dead_jobs(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        job_id = await nq.enqueue(Job("later", {}, run_after=_in(3600)))
        assert await nq.cancel_job(job_id) is True
        job = await nq.get_job(job_id)
        assert job is not None
        assert (job.status, job.error) == ("dead", "cancelled")
        assert await nq.cancel_job(job_id) is False  # dead already
        await nq.start(Handler("done", noop))
        processed = await nq.enqueue(Job("done", {}))
        await drain(nq)
        assert await nq.cancel_job(processed) is False
        assert await nq.cancel_job("999999") is False
        assert await nq.cancel_job("nope") is False


async def test_a_running_job_cannot_be_cancelled_or_deleted(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        started, release = anyio.Event(), anyio.Event()

        async def busy(job: Job) -> None:
            started.set()
            await release.wait()

        await nq.start(Handler("busy", busy))
        job_id = await nq.enqueue(Job("busy", {}))
        with anyio.fail_after(10):
            await started.wait()
        assert await nq.cancel_job(job_id) is False
        assert await nq.delete_job(job_id) is False
        running = await nq.retry_job(job_id)  # left as it is
        assert running.id == job_id
        release.set()
        await drain(nq)
        job = await nq.get_job(job_id)
        assert job is not None
        assert job.status == "processed"


async def test_delete_removes_live_and_dead_jobs(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        dead_id = await dead_job(nq)
        live_id = await nq.enqueue(Job("later", {}, run_after=_in(3600)))
        assert await nq.delete_job(live_id) is True
        assert await nq.delete_job(dead_id) is True
        assert await nq.get_job(live_id) is None
        assert await nq.get_job(dead_id) is None
        assert await nq.delete_job(live_id) is False
        assert await nq.delete_job("nope") is False
        # A deleted job no longer blocks its twin.
        await nq.enqueue(Job("later", {}, run_after=_in(3600)))


async def test_queue_stats_counts_jobs_by_state(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        await dead_job(nq, "mixed")  # started: mixed's jobs below fail
        await nq.start(Handler("ok", noop))
        await nq.enqueue(Job("ok", {}))
        await drain(nq)
        await nq.enqueue(Job("idle", {"due": 1}))  # no handler: stays due
        await nq.enqueue(Job("idle", {"due": 2}, run_after=_in(-30)))
        await nq.enqueue(Job("idle", {"later": 1}, run_after=_in(3600)))
        await nq.enqueue(Job("mixed", {"retry": 1}, max_retries=3))
        await drain(nq)  # fails once: waits for its retry
        stats = {s.queue: s for s in await nq.queue_stats()}
        assert sorted(stats) == ["idle", "mixed", "ok"]
        assert stats["ok"] == QueueStats("ok", 0, 0, 0, 0, 1, 0, None, False)
        mixed = stats["mixed"]
        assert (mixed.due, mixed.failed, mixed.dead, mixed.processed) == (0, 1, 1, 0)
        idle = stats["idle"]
        assert (idle.due, idle.scheduled, idle.running, idle.failed) == (2, 1, 0, 0)
        assert idle.oldest_due_seconds is not None
        assert 29 <= idle.oldest_due_seconds < 60


async def test_old_processed_and_dead_jobs_are_pruned(connection_string: str) -> None:
    async with opened(connection_string, keep_processed=0.2, keep_dead=0.2) as nq:
        dead_id = await dead_job(nq)
        await nq.start(Handler("ok", noop))
        done_id = await nq.enqueue(Job("ok", {}))
        await drain(nq)
        if connection_string == "memory://":
            await fast_forward(nq, 1)  # the in-memory backend's clock
        with anyio.fail_after(10):
            while True:  # polled: pruning announces nothing
                if not (await nq.get_job(done_id) or await nq.get_job(dead_id)):
                    break
                await anyio.sleep(0.05)


async def test_retention_none_keeps_jobs(connection_string: str) -> None:
    async with opened(connection_string, keep_processed=None, keep_dead=None) as nq:
        await nq.start(Handler("ok", noop))
        done_id = await nq.enqueue(Job("ok", {}))
        await drain(nq)
        assert await nq._prune_now() == (0, 0)
        assert await nq.get_job(done_id) is not None
        assert await nq._prune_now(0) == (1, 0)  # the command line's --older-than
        assert await nq.get_job(done_id) is None


async def _wait_status(nq: Backend, job_id: str, status: str) -> None:
    with anyio.fail_after(10):
        while True:
            job = await nq.get_job(job_id)
            if job is not None and job.status == status:
                return
            await anyio.sleep(0.02)


def _in(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)
