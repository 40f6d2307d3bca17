"""Lease mode on PostgreSQL: claims, heartbeats, fencing, the job's lazy
transaction, release on shutdown, and jobs whose worker was lost.

Real processes that die mid-job are in test_lease_processes.py; here a lost
worker is staged in the database (an expired lease), and a lease taken over
elsewhere is staged by changing its token.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from neoq_anyio import (
    Handler,
    Job,
    LeaseLostError,
    current_transaction,
)

from .conftest import Database, wait_until
from .test_processing import Recorder, backend

STOLEN = 42  # a fencing token no worker holds: "someone else claimed the job"


def _job_row(job_id: str) -> str:
    return (
        f"SELECT status::text, retries, lease_token, error FROM neoq_jobs WHERE id = {int(job_id)}"
    )


async def _steal(db: Database, job_id: str) -> None:
    """Stage a takeover: the lease now belongs to someone else."""
    await db.execute(
        f"UPDATE neoq_jobs SET lease_token = {STOLEN}, "
        f"lease_expires_at = now() + interval '1 hour' WHERE id = {int(job_id)}"
    )


async def test_job_runs_leased_and_reads_running(dsn: str, db: Database) -> None:
    started = anyio.Event()
    finish = anyio.Event()

    async def handle(job: Job) -> None:
        assert job.status == "new"  # as stored, as in transaction mode
        assert job.retries == 0
        started.set()
        await finish.wait()

    async with backend(dsn) as nq:
        await nq.start(Handler("leased", handle, execution="lease"))
        job_id = await nq.enqueue(Job("leased"))
        with anyio.fail_after(10):
            await started.wait()
        job = await nq.get_job(job_id)
        assert job is not None
        assert job.status == "running"
        [stats] = await nq.queue_stats()
        assert (stats.running, stats.due) == (1, 0)
        assert nq.statistics().jobs_in_flight == 1
        assert [job.id for job in await nq.list_jobs(status="running")] == [job_id]
        assert await nq.list_jobs(status="new") == []
        finish.set()
        await db.wait_for(_job_row(job_id), lambda s: s == "processed")
    assert await db.fetch(_job_row(job_id)) == [("processed", 0, None, None)]


async def test_failures_count_as_in_transaction_mode(dsn: str, db: Database) -> None:
    runs: list[int] = []

    async def fail(job: Job) -> None:
        runs.append(job.retries)
        raise RuntimeError(f"run {len(runs)}")

    async with backend(dsn) as nq:
        await nq.start(Handler("failing", fail, execution="lease"))
        job_id = await nq.enqueue(Job("failing", max_retries=1))
        await db.wait_for(_job_row(job_id), lambda s: s == "failed")
        assert await db.fetch(_job_row(job_id)) == [("failed", 0, None, "RuntimeError: run 1")]
        await db.execute(f"UPDATE neoq_jobs SET run_after = now() WHERE id = {int(job_id)}")
        nq._pending.poke()  # type: ignore[attr-defined]
        await db.wait_for(f"SELECT count(*) FROM neoq_dead_jobs WHERE id = {int(job_id)}", bool)
    assert runs == [0, 1]
    assert await db.fetch(
        f"SELECT retries, error FROM neoq_dead_jobs WHERE id = {int(job_id)}"
    ) == [(1, "RuntimeError: run 2")]


async def test_a_job_running_past_its_lease_is_not_run_twice(dsn: str, db: Database) -> None:
    runs: list[str | None] = []
    started = anyio.Event()
    done = anyio.Event()

    async def slow(job: Job) -> None:
        runs.append(job.id)
        started.set()
        await anyio.sleep(3)  # three leases long: heartbeats keep it
        done.set()

    # Two backends, as two processes: the second looks for expired leases
    # every 50 ms and would take the job over if its lease ever lapsed.
    async with backend(dsn) as first, backend(dsn) as second:
        await first.start(Handler("slow", slow, execution="lease", lease_duration=1))
        job_id = await first.enqueue(Job("slow"))
        with anyio.fail_after(10):
            await started.wait()
        await second.start(Handler("slow", slow, execution="lease", lease_duration=1))
        with anyio.fail_after(10):
            await done.wait()
        await db.wait_for(_job_row(job_id), lambda s: s == "processed")
    assert runs == [job_id]
    assert await db.fetch(_job_row(job_id)) == [("processed", 0, None, None)]


@pytest.mark.parametrize("then", ["returns", "raises"])
async def test_a_worker_whose_lease_was_taken_over_records_nothing(
    dsn: str, db: Database, then: str
) -> None:
    stolen = anyio.Event()
    started = anyio.Event()
    ended = anyio.Event()

    async def handle(job: Job) -> None:
        started.set()
        await stolen.wait()
        ended.set()
        if then == "raises":
            raise RuntimeError("too late")

    async with backend(dsn) as nq:
        await nq.start(Handler("taken", handle, execution="lease", lease_duration=30))
        job_id = await nq.enqueue(Job("taken"))
        with anyio.fail_after(10):
            await started.wait()
        await _steal(db, job_id)
        stolen.set()
        with anyio.fail_after(10):
            await ended.wait()
        await wait_until(lambda: nq.statistics().jobs_in_flight == 0)
    # Neither a success nor a failure was written over the new holder's lease.
    assert await db.fetch(_job_row(job_id)) == [("new", 0, STOLEN, None)]


class Endless:
    """A handler that runs until cancelled, and says when it started and ended."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.cancelled = anyio.Event()

    async def __call__(self, job: Job) -> None:
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.cancelled.set()


async def test_a_lost_lease_cancels_the_handler(dsn: str, db: Database) -> None:
    handle = Endless()
    async with backend(dsn) as nq:
        await nq.start(Handler("lost", handle, execution="lease", lease_duration=0.6))
        job_id = await nq.enqueue(Job("lost"))
        with anyio.fail_after(10):
            await handle.started.wait()
        await _steal(db, job_id)
        with anyio.fail_after(5):  # the next heartbeat, 0.2 s away, finds it lost
            await handle.cancelled.wait()
        await wait_until(lambda: nq.statistics().jobs_in_flight == 0)
        before = await db.value(f"SELECT lease_expires_at FROM neoq_jobs WHERE id = {int(job_id)}")
        await anyio.sleep(0.5)  # heartbeats go on for other jobs, not this one
        assert (
            await db.value(f"SELECT lease_expires_at FROM neoq_jobs WHERE id = {int(job_id)}")
            == before
        )
    assert await db.fetch(_job_row(job_id)) == [("new", 0, STOLEN, None)]


async def test_handler_writes_commit_with_the_completion(dsn: str, db: Database) -> None:
    async with backend(dsn) as nq:
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE writes (job_id bigint, n int)")
        rec = Recorder(2)

        async def write(job: Job) -> None:
            conn = current_transaction()
            await conn.execute(
                "INSERT INTO writes VALUES (%s, %s)", (int(job.id or 0), job.payload["n"])
            )
            cur = conn.cursor()
            await cur.execute("SELECT count(*) FROM writes WHERE job_id = %s", (int(job.id or 0),))
            assert await cur.fetchone() == (1,)
            await nq.enqueue(Job("child", {"of": job.id}), connection=current_transaction())
            await rec(job)
            if job.payload["n"] == 2:
                raise RuntimeError("undo my writes")

        children = Recorder()
        await nq.start(Handler("writer", write, execution="lease"))
        await nq.start(Handler("child", children, execution="lease"))
        ok = await nq.enqueue(Job("writer", {"n": 1}))
        failing = await nq.enqueue(Job("writer", {"n": 2}))
        await rec.wait()
        await children.wait()
        await db.wait_for(_job_row(ok), lambda s: s == "processed")
        await db.wait_for(_job_row(failing), lambda s: s == "failed")
    assert await db.fetch("SELECT job_id, n FROM writes") == [(int(ok), 1)]
    assert [job.payload for job in children.jobs] == [{"of": ok}]
    assert await db.value("SELECT count(*) FROM neoq_jobs WHERE queue = 'child'") == 1


async def test_the_transaction_of_a_job_whose_lease_was_lost_does_not_open(
    dsn: str, db: Database
) -> None:
    stolen = anyio.Event()
    started = anyio.Event()
    raised: list[BaseException] = []

    async def handle(job: Job) -> None:
        started.set()
        await stolen.wait()
        try:
            await current_transaction().execute("SELECT 1")
        except LeaseLostError as exc:
            raised.append(exc)
            raise

    async with backend(dsn) as nq:
        await nq.start(Handler("late", handle, execution="lease", lease_duration=30))
        job_id = await nq.enqueue(Job("late"))
        with anyio.fail_after(10):
            await started.wait()
        await _steal(db, job_id)
        stolen.set()
        await wait_until(lambda: bool(raised) and nq.statistics().jobs_in_flight == 0)
    assert await db.fetch(_job_row(job_id)) == [("new", 0, STOLEN, None)]


async def test_writes_roll_back_when_the_lease_is_lost_mid_transaction(
    dsn: str, db: Database
) -> None:
    """The job's session dies with its writes (say, past transaction_timeout),
    and the job is claimed elsewhere: the completion is fenced out."""
    wrote = anyio.Event()
    taken_over = anyio.Event()
    pids: list[int] = []

    async def handle(job: Job) -> None:
        conn = current_transaction()
        await conn.execute("INSERT INTO writes VALUES (1)")
        pids.append(conn.info.backend_pid)
        wrote.set()
        await taken_over.wait()

    async with backend(dsn) as nq:
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE writes (n int)")
        await nq.start(Handler("cut", handle, execution="lease", lease_duration=30))
        job_id = await nq.enqueue(Job("cut"))
        with anyio.fail_after(10):
            await wrote.wait()
        await db.execute(f"SELECT pg_terminate_backend({pids[0]})")
        await db.wait_for(  # the row lock died with the session
            f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pids[0]}", lambda n: n == 0
        )
        await _steal(db, job_id)
        taken_over.set()
        await wait_until(lambda: nq.statistics().jobs_in_flight == 0)
    assert await db.value("SELECT count(*) FROM writes") == 0
    assert await db.fetch(_job_row(job_id)) == [("new", 0, STOLEN, None)]


async def test_a_thousand_sleeping_jobs_on_four_connections(dsn: str, db: Database) -> None:
    count = 1000
    running = 0
    all_running = anyio.Event()
    release = anyio.Event()

    async def sleep(job: Job) -> None:
        nonlocal running
        running += 1
        if running == count:
            all_running.set()
        await release.wait()

    async with backend(dsn + " pool_max_conns=4") as nq:
        await nq.start(Handler("sleepy", sleep, concurrency=count, execution="lease"))
        await nq.enqueue_many([Job("sleepy", {"n": n}) for n in range(count)])
        with anyio.fail_after(30):
            await all_running.wait()
        pool = nq.statistics().pool
        assert pool is not None
        assert pool.size <= 4
        [stats] = await nq.queue_stats()
        assert stats.running == count
        release.set()
        await db.wait_for(
            "SELECT count(*) FROM neoq_jobs WHERE status = 'processed'",
            lambda n: n == count,
            timeout=30,
        )


async def test_lease_and_transaction_queues_in_one_backend(dsn: str, db: Database) -> None:
    leased, transacted = Recorder(20), Recorder(20)
    async with backend(dsn) as nq:
        await nq.start(Handler("leased", leased, concurrency=5, execution="lease"))
        await nq.start(Handler("transacted", transacted, concurrency=5))
        for n in range(20):
            await nq.enqueue(Job("leased", {"n": n}))
            await nq.enqueue(Job("transacted", {"n": n}))
        await leased.wait()
        await transacted.wait()
        await db.wait_for(
            "SELECT count(*) FROM neoq_jobs WHERE status = 'processed'", lambda n: n == 40
        )
    assert {job.status for job in leased.jobs} == {job.status for job in transacted.jobs} == {"new"}


@pytest.mark.parametrize("status", ["new", "failed"])
async def test_a_job_cut_short_by_shutdown_is_released_as_it_was(
    dsn: str, db: Database, status: str
) -> None:
    started = anyio.Event()

    async def forever(job: Job) -> None:
        started.set()
        await anyio.sleep_forever()

    async with backend(dsn, shutdown_timeout=0.2) as nq:
        job_id = await nq.enqueue(Job("cut"))
        if status == "failed":  # a failed job, due for its third run
            await db.execute(
                f"UPDATE neoq_jobs SET status = 'failed', retries = 2 WHERE id = {int(job_id)}"
            )
        await nq.start(Handler("cut", forever, execution="lease", lease_duration=60))
        with anyio.fail_after(10):
            await started.wait()
        assert await db.value(f"SELECT retries FROM neoq_jobs WHERE id = {int(job_id)}") == (
            3 if status == "failed" else 0
        )
    retries = 2 if status == "failed" else 0
    assert await db.fetch(_job_row(job_id)) == [(status, retries, None, None)]
    # Due again at once, not after its 60 s lease: the next worker runs it now.
    rec = Recorder()
    async with backend(dsn) as nq:
        await nq.start(Handler("cut", rec, execution="lease"))
        await rec.wait(timeout=10)
    assert rec.jobs[0].retries == retries + (status == "failed")


async def test_an_expired_lease_is_taken_over_and_its_attempt_counts(
    dsn: str, db: Database
) -> None:
    rec = Recorder()
    async with backend(dsn) as nq:
        job_id = await nq.enqueue(Job("orphan", max_retries=5))
        # A worker claimed it (first attempt) and died: its lease lapsed.
        await db.execute(
            "UPDATE neoq_jobs SET lease_token = 7, lease_expires_at = now() - interval '1 s' "
            f"WHERE id = {int(job_id)}"
        )
        assert (await nq.get_job(job_id)).status == "running"  # type: ignore[union-attr]
        await nq.start(Handler("orphan", rec, execution="lease", lease_duration=1))
        await rec.wait()
        await db.wait_for(_job_row(job_id), lambda s: s == "processed")
    assert rec.jobs[0].retries == 1
    assert "JobLostError" in (rec.jobs[0].error or "")
    assert await db.fetch(_job_row(job_id)) == [("processed", 1, None, None)]


async def test_a_job_whose_lost_attempts_used_its_retries_dies_unrun(
    dsn: str, db: Database
) -> None:
    rec = Recorder()
    async with backend(dsn) as nq:
        job_id = await nq.enqueue(Job("doomed", max_retries=2))
        # Its third attempt (retries 2) was claimed, and its worker died too.
        await db.execute(
            "UPDATE neoq_jobs SET status = 'failed', retries = 2, lease_token = 7, "
            f"lease_expires_at = now() - interval '1 s' WHERE id = {int(job_id)}"
        )
        await nq.start(Handler("doomed", rec, execution="lease", lease_duration=1))
        await db.wait_for(f"SELECT count(*) FROM neoq_dead_jobs WHERE id = {int(job_id)}", bool)
    assert rec.jobs == []
    [(retries, error)] = await db.fetch(
        f"SELECT retries, error FROM neoq_dead_jobs WHERE id = {int(job_id)}"
    )
    assert retries == 2
    assert error.startswith("JobLostError")


@pytest.mark.parametrize("execution", ["transaction", "lease"])
async def test_a_job_behind_the_watermark_is_found(dsn: str, db: Database, execution: Any) -> None:
    first = Recorder(5)
    async with backend(dsn, pending_job_check_interval=60) as nq:
        await nq.start(Handler("marks", first, concurrency=2, execution=execution))
        for n in range(5):
            await nq.enqueue(Job("marks", {"n": n}))
        await first.wait()
        # An old run_after puts the job behind every job claimed so far.
        long_ago = datetime.now(UTC) - timedelta(hours=1)
        first.done = anyio.Event()
        first.expected = 6
        await nq.enqueue(Job("marks", {"n": "old"}, run_after=long_ago))
        await first.wait(timeout=5)
    assert first.jobs[-1].payload == {"n": "old"}


async def test_lease_mode_allows_long_or_no_job_timeout(dsn: str) -> None:
    async def handle(job: Job) -> None:
        pass

    async with backend(dsn, transaction_timeout=5) as nq:
        await nq.start(Handler("long", handle, execution="lease", job_timeout=3600))
        await nq.start(Handler("none", handle, execution="lease", job_timeout=None))


async def test_a_success_breaking_a_deferred_constraint_fails_in_its_transaction(
    dsn: str, db: Database
) -> None:
    async def duplicate(job: Job) -> None:
        conn = current_transaction()
        await conn.execute("INSERT INTO once VALUES (1), (1)")  # checked at commit

    async with backend(dsn) as nq:
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE once (n int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        await nq.start(Handler("deferred", duplicate, execution="lease"))
        job_id = await nq.enqueue(Job("deferred"))
        await db.wait_for(_job_row(job_id), lambda s: s == "failed")
    [(status, retries, token, error)] = await db.fetch(_job_row(job_id))
    assert (status, retries, token) == ("failed", 0, None)
    assert "once_n_key" in error
    assert await db.value("SELECT count(*) FROM once") == 0


async def test_cancelling_a_running_job_cancels_its_handler(dsn: str, db: Database) -> None:
    handle = Endless()
    async with backend(dsn) as nq:
        await nq.start(Handler("stop", handle, execution="lease", lease_duration=0.6))
        job_id = await nq.enqueue(Job("stop"))
        with anyio.fail_after(10):
            await handle.started.wait()
        assert await nq.cancel_job(job_id) is True
        with anyio.fail_after(5):  # at the next heartbeat, 0.2 s away
            await handle.cancelled.wait()
        await wait_until(lambda: nq.statistics().jobs_in_flight == 0)
    assert await db.fetch(f"SELECT error FROM neoq_dead_jobs WHERE id = {int(job_id)}") == [
        ("cancelled",)
    ]
    assert await db.value(f"SELECT count(*) FROM neoq_jobs WHERE id = {int(job_id)}") == 0


async def test_job_timeout_and_deadline_in_lease_mode(dsn: str, db: Database) -> None:
    async def stuck(job: Job) -> None:
        if job.payload["swallow"]:
            with anyio.CancelScope(shield=True):  # ignores its cancellation a while
                await anyio.sleep(0.3)
            return
        await anyio.sleep_forever()

    async with backend(dsn) as nq:
        await nq.start(Handler("slow", stuck, execution="lease", job_timeout=0.2, concurrency=2))
        stuck_id = await nq.enqueue(Job("slow", {"swallow": False}))
        swallow_id = await nq.enqueue(Job("slow", {"swallow": True}))
        late_id = await nq.enqueue(
            Job("slow", {"swallow": None}, deadline=datetime.now(UTC) - timedelta(seconds=1))
        )
        for job_id in (stuck_id, swallow_id):
            await db.wait_for(_job_row(job_id), lambda s: s == "failed")
        await db.wait_for(f"SELECT count(*) FROM neoq_dead_jobs WHERE id = {int(late_id)}", bool)
    for job_id in (stuck_id, swallow_id):
        [(_, retries, token, error)] = await db.fetch(_job_row(job_id))
        assert (retries, token) == (0, None)
        assert error.startswith("JobTimeoutError")
    assert (
        await db.value(f"SELECT error FROM neoq_dead_jobs WHERE id = {int(late_id)}")
    ).startswith("JobDeadlineError")


async def test_workers_idle_past_their_job_timeout_still_take_jobs(dsn: str, db: Database) -> None:
    # A worker's timeout scope outlives its job: one that fires while the
    # worker idles must leave no stale place in the idle line, where a job
    # handed over would never run (its lease kept alive by heartbeats).
    rec = Recorder(expected=1)
    async with backend(dsn) as nq:
        await nq.start(Handler("q", rec, execution="lease", job_timeout=0.1, concurrency=2))
        await nq.enqueue(Job("q", {"n": 0}))
        await rec.wait()
        await anyio.sleep(0.3)  # the scenario: idle for three job timeouts
        rec.expected, rec.done = 5, anyio.Event()
        for n in range(1, 5):
            await nq.enqueue(Job("q", {"n": n}))
        await rec.wait(timeout=5)
        assert sorted(job.payload["n"] for job in rec.jobs) == [0, 1, 2, 3, 4]
