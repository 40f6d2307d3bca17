"""Workers that stop or die: shutdown takes no new job, and a worker process
killed mid-job loses nothing (its job runs again, exactly once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import anyio

from neoq_anyio import Handler, Job, current_transaction

from .conftest import Database, wait_until
from .test_processing import Recorder, backend

if TYPE_CHECKING:
    from pathlib import Path


async def test_workers_waiting_for_a_connection_take_nothing_after_shutdown(
    dsn: str, db: Database
) -> None:
    started = anyio.Event()
    finish = anyio.Event()
    late = Recorder()

    async def busy(job: Job) -> None:
        started.set()
        await finish.wait()

    # Long check intervals: no background query competes for a connection.
    quiet = {"job_check_interval": 60, "pending_job_check_interval": 60, "shutdown_timeout": 10}
    # Three connections: two kept for enqueue and the like, one for workers.
    async with backend(dsn + " pool_max_conns=3", **quiet) as nq:
        await nq.start(Handler("busy", busy, concurrency=1))
        await nq.start(Handler("late", late, concurrency=1))
        await nq.enqueue(Job("busy"))
        with anyio.fail_after(10):
            await started.wait()

        def waiting() -> int:
            pool = nq.statistics().pool
            assert pool is not None
            return pool.waiting

        async with anyio.create_task_group() as tg:
            # The busy job holds the workers' connection, so the late queue's
            # worker waits for it when its job comes.
            await db.execute(
                "INSERT INTO neoq_jobs (queue, fingerprint, payload) VALUES ('late', 'x', '{}')"
            )
            await wait_until(lambda: waiting() == 1)
            tg.start_soon(nq.shutdown)
            await wait_until(lambda: nq._closing)
            # The busy job ends and hands its connection to that worker: it
            # must see that shutdown began, and take nothing.
            finish.set()
    assert late.jobs == []
    assert await db.value("SELECT status::text FROM neoq_jobs WHERE queue = 'late'") == "new"


CHILD = """
import os
import anyio
from neoq_anyio import Handler, Job, current_transaction, open_backend

async def handle(job: Job) -> None:
    # Written in the job's transaction, which the kill aborts.
    await current_transaction().execute("INSERT INTO runs (job_id) VALUES (%s)", (int(job.id),))
    with open(os.environ["NEOQ_CHILD_STARTED"], "w") as started:
        started.write(job.id or "")
    await anyio.sleep_forever()

async def main() -> None:
    async with open_backend(os.environ["NEOQ_CHILD_DSN"], job_check_interval=0.05) as nq:
        await nq.start(Handler("killed", handle))
        await anyio.sleep_forever()

anyio.run(main, backend=os.environ["NEOQ_CHILD_LOOP"])
"""


def _log_file(path: Path) -> Any:
    return path.open("wb")


async def test_job_of_a_killed_worker_process_runs_again_exactly_once(
    dsn: str, db: Database, tmp_path: Path, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    async with backend(dsn) as nq:  # creates the schema
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE runs (job_id bigint NOT NULL)")
        job_id = await nq.enqueue(Job("killed", {"n": 1}))

    started = tmp_path / "started"
    env = {
        **os.environ,
        "NEOQ_CHILD_DSN": dsn,
        "NEOQ_CHILD_STARTED": str(started),
        "NEOQ_CHILD_LOOP": anyio_backend[0],
    }
    with _log_file(tmp_path / "child.log") as log:
        child = await anyio.open_process(
            [sys.executable, "-c", CHILD], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        with anyio.fail_after(30):
            while not started.exists():
                assert child.returncode is None, (tmp_path / "child.log").read_text()
                await anyio.sleep(0.02)
        assert started.read_text() == job_id
        child.send_signal(signal.SIGKILL)  # mid-job: no cleanup, no rollback sent
        with anyio.fail_after(10):
            await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
        with anyio.move_on_after(10, shield=True):
            await child.aclose()

    runs: list[str | None] = []
    done = anyio.Event()

    async def handle(job: Job) -> None:
        await current_transaction().execute(
            "INSERT INTO runs (job_id) VALUES (%s)", (int(job.id or 0),)
        )
        runs.append(job.id)
        done.set()

    # The killed session's transaction aborts when the server sees the socket
    # close; until then the row stays locked and is skipped, then the
    # pending-job poller finds it due again.
    async with backend(dsn, pending_job_check_interval=0.1) as nq:
        await nq.start(Handler("killed", handle))
        with anyio.fail_after(20):
            await done.wait()
        await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {int(job_id)}", lambda s: s == "processed"
        )
    assert runs == [job_id]
    # The killed run's write rolled back with its transaction: one completed run.
    assert await db.fetch("SELECT job_id FROM runs") == [(int(job_id),)]
    assert await db.value(f"SELECT retries FROM neoq_jobs WHERE id = {int(job_id)}") == 0
