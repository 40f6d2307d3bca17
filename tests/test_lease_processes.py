"""Lease mode with real worker processes that die: a job whose worker is
SIGKILLed runs again once its lease expires, not before, exactly once; a job
that kills its worker every time ends dead after ``max_retries + 1`` attempts.

The children run the lease-mode worker on the test's loop (asyncio or trio)
and tell the test what they do through files: a process killed with SIGKILL
writes nothing more, but what it wrote before is on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import Process

from neoq_anyio import Handler, Job, current_transaction

from .conftest import Database
from .test_processing import backend

if TYPE_CHECKING:
    from pathlib import Path

_CHILD_COMMON = """
import os
import signal
import anyio
from neoq_anyio import Handler, Job, current_transaction, open_backend

LEASE = float(os.environ["NEOQ_CHILD_LEASE"])

def tell(variable: str, text: str) -> None:
    # Written whole, then renamed: the test never reads half a file.
    path = os.environ[variable]
    with open(path + ".tmp", "w") as out:
        out.write(text)
    os.replace(path + ".tmp", path)

async def serve(queue: str, handle, check_interval: float) -> None:
    async with open_backend(
        os.environ["NEOQ_CHILD_DSN"], job_check_interval=check_interval
    ) as nq:
        await nq.start(Handler(queue, handle, execution="lease", lease_duration=LEASE))
        await anyio.sleep_forever()
"""

KILLED_MID_JOB = (
    _CHILD_COMMON
    + """
async def handle(job: Job) -> None:
    tell("NEOQ_CHILD_CLAIMED", job.id)
    # Longer than the lease: only the heartbeats keep the job this worker's.
    await anyio.sleep(LEASE * 1.2)
    # Written in the job's transaction, which the kill aborts.
    await current_transaction().execute("INSERT INTO runs (job_id) VALUES (%s)", (int(job.id),))
    tell("NEOQ_CHILD_WROTE", job.id)
    await anyio.sleep_forever()

anyio.run(serve, "killed", handle, 0.05, backend=os.environ["NEOQ_CHILD_LOOP"])
"""
)

KILLS_ITS_WORKER = (
    _CHILD_COMMON
    + """
async def handle(job: Job) -> None:
    # The attempt is on disk before the worker dies.
    with open(os.environ["NEOQ_CHILD_ATTEMPTS"], "a") as attempts:
        attempts.write(f"{job.retries}\\n")
    os.kill(os.getpid(), signal.SIGKILL)

anyio.run(serve, "doomed", handle, 0.2, backend=os.environ["NEOQ_CHILD_LOOP"])
"""
)


@asynccontextmanager
async def _child(script: str, env: dict[str, str], log: Path) -> AsyncIterator[Process]:
    """A Python process running ``script`` for the block (output in ``log``);
    killed at the end if it still runs."""
    with log.open("ab") as out:
        process = await anyio.open_process(
            [sys.executable, "-c", script],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.move_on_after(10, shield=True):
            await process.aclose()


async def _wait_for_file(
    path: Path, child: Process, log: Path, timeout: float, *, ran_here: anyio.Event | None = None
) -> str:
    """``path``'s text once the child wrote it (bounded); fails if the child
    exits first, or if the job runs in this process first (``ran_here`` set)."""
    written = anyio.Path(path)
    with anyio.fail_after(timeout):
        while not await written.exists():
            assert child.returncode is None, await anyio.Path(log).read_text()
            assert ran_here is None or not ran_here.is_set(), f"ran here before {path.name}"
            await anyio.sleep(0.02)
    return await written.read_text()


def _env(dsn: str, loop: str, lease: float, **files: Path) -> dict[str, str]:
    paths = {f"NEOQ_CHILD_{name.upper()}": str(path) for name, path in files.items()}
    return {
        "NEOQ_CHILD_DSN": dsn,
        "NEOQ_CHILD_LOOP": loop,
        "NEOQ_CHILD_LEASE": str(lease),
        **paths,
    }


async def test_job_of_a_killed_lease_worker_runs_again_once_its_lease_expires(
    dsn: str, db: Database, tmp_path: Path, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    lease = 2.0
    async with backend(dsn) as nq:  # creates the schema
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE runs (job_id bigint NOT NULL)")
        job_id = await nq.enqueue(Job("killed", {"n": 1}))
    assert job_id is not None

    runs: list[tuple[float, datetime, Job]] = []
    ran = anyio.Event()

    async def handle(job: Job) -> None:
        started = anyio.current_time()
        cur = await current_transaction().execute(
            "INSERT INTO runs (job_id) VALUES (%s) RETURNING clock_timestamp()",
            (int(job.id or 0),),
        )
        row = await cur.fetchone()
        assert isinstance(row, tuple)
        runs.append((started, row[0], job))
        ran.set()

    claimed, wrote, log = tmp_path / "claimed", tmp_path / "wrote", tmp_path / "child.log"
    env = _env(dsn, anyio_backend[0], lease, claimed=claimed, wrote=wrote)
    lease_of_job = (
        "SELECT lease_expires_at, "
        "extract(epoch FROM lease_expires_at - clock_timestamp())::float8 "
        f"FROM neoq_jobs WHERE id = {int(job_id)}"
    )
    async with _child(KILLED_MID_JOB, env, log) as child:
        assert await _wait_for_file(claimed, child, log, timeout=30) == job_id
        [(claimed_until, _)] = await db.fetch(lease_of_job)
        # This process's rescuer looks for expired leases while the child
        # still runs the job: heartbeats must keep it from taking the job.
        async with backend(dsn) as nq:
            await nq.start(Handler("killed", handle, execution="lease", lease_duration=lease))
            running = await nq.get_job(job_id)
            assert running is not None
            assert running.status == "running"
            assert running.retries == 0
            [stats] = [s for s in await nq.queue_stats() if s.queue == "killed"]
            assert (stats.running, stats.due) == (1, 0)

            # The lease holds past its first duration: the job does not run here.
            wrote_text = await _wait_for_file(
                wrote, child, log, timeout=lease * 1.2 + 10, ran_here=ran
            )
            assert wrote_text == job_id
            # The lease as the last heartbeat left it. The child's open
            # transaction locks the row (no heartbeat, no takeover while it
            # lives), and its own extension of the lease rolls back with it.
            [(expires_at, remaining)] = await db.fetch(lease_of_job)
            assert expires_at > claimed_until  # extended by heartbeats
            child.send_signal(signal.SIGKILL)  # mid-job: no cleanup, no rollback sent
            killed_at = anyio.current_time()
            with anyio.fail_after(10):
                await child.wait()
            with anyio.fail_after(max(remaining, 0) + 10):
                await ran.wait()
            await db.wait_for(
                f"SELECT status FROM neoq_jobs WHERE id = {int(job_id)}",
                lambda s: s == "processed",
            )

    [(started, db_started, job)] = runs  # exactly once
    # Not before the lost lease expired: the database's clock says so
    # exactly; this process's clock, measured from the kill, roughly.
    assert db_started >= expires_at
    assert started - killed_at >= remaining - 0.25
    assert job.id == job_id
    assert job.retries == 1  # the lost attempt counts
    assert job.error is not None
    assert "JobLostError" in job.error
    # The killed run's write rolled back with its transaction: one completed run.
    assert await db.fetch("SELECT job_id FROM runs") == [(int(job_id),)]
    row = await db.fetch(
        f"SELECT status, retries, error, lease_token FROM neoq_jobs WHERE id = {int(job_id)}"
    )
    assert row == [("processed", 1, None, None)]


async def test_job_that_kills_its_worker_every_time_dies_after_max_retries_plus_one_attempts(
    dsn: str, db: Database, tmp_path: Path, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    max_retries, lease = 2, 1.0
    async with backend(dsn) as nq:  # creates the schema
        job_id = await nq.enqueue(Job("doomed", {"n": 1}, max_retries=max_retries))
    assert job_id is not None

    dead = f"SELECT count(*) FROM neoq_dead_jobs WHERE id = {int(job_id)}"
    attempts, log_path = tmp_path / "attempts", tmp_path / "child.log"
    log = anyio.Path(log_path)
    env = _env(dsn, anyio_backend[0], lease, attempts=attempts)
    killed_by_its_job: list[bool] = []
    with anyio.fail_after(50):
        # One worker process after another: each runs the job (the first
        # claims it, the next ones take over the lease the last one lost)
        # and dies of it, until a worker finds no attempt left.
        while not await db.value(dead):
            assert len(killed_by_its_job) < max_retries + 2, await log.read_text()
            async with _child(KILLS_ITS_WORKER, env, log_path) as child:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_cancel_on_exit, child, tg.cancel_scope)
                    await db.wait_for(dead, lambda n: n > 0, timeout=50)
                    tg.cancel_scope.cancel()
                killed_by_its_job.append(child.returncode == -signal.SIGKILL)

    # Three attempts, each counted; the fourth claim moved the job to the
    # dead jobs without running it, and the worker that did so lived on.
    output = await log.read_text()
    assert (await anyio.Path(attempts).read_text()).split() == ["0", "1", "2"], output
    assert killed_by_its_job == [True, True, True, False], output
    assert await db.value(f"SELECT count(*) FROM neoq_jobs WHERE id = {int(job_id)}") == 0
    [(retries, error)] = await db.fetch(
        f"SELECT retries, error FROM neoq_dead_jobs WHERE id = {int(job_id)}"
    )
    assert retries == max_retries
    assert error.startswith("JobLostError"), error


async def _cancel_on_exit(child: Process, scope: anyio.CancelScope) -> None:
    await child.wait()
    scope.cancel()
