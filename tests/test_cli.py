"""The ``neoq-anyio`` command line, run as a real subprocess with real signals.

Each async test drives the CLI on the loop it runs on (``--loop``), so the
worker command is covered on asyncio and trio. The application module the
worker imports is written into a temporary directory, which becomes the
subprocess's working directory (the CLI puts it on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from neoq_anyio import Handler, Job, open_backend
from neoq_anyio.testing import drain

from ._processes import Running, running
from .conftest import Database, wait_until

APP = """
import os
import pathlib

import anyio

from neoq_anyio import Handler, Job

MARKS = pathlib.Path(os.environ["MARKS"])


async def run(job: Job) -> None:
    (MARKS / f"started-{job.id}").touch()
    if job.payload["mode"] == "forever":
        await anyio.sleep_forever()
    while job.payload["mode"] == "release" and not (MARKS / "release").exists():
        await anyio.sleep(0.01)


async def setup(nq) -> None:
    await nq.start(Handler("cli", run, concurrency=2))
"""


@pytest.fixture
def app(tmp_path: Path) -> Path:
    (tmp_path / "cli_app.py").write_text(APP)
    return tmp_path


def _env(dsn: str, marks: Path) -> dict[str, str]:
    return {**os.environ, "NEOQ_DSN": dsn, "MARKS": str(marks), "PYTHONUNBUFFERED": "1"}


@asynccontextmanager
async def worker(app: Path, dsn: str, loop: str) -> AsyncIterator[Running]:
    """Run the worker for the block; killed if still running at the end."""
    command = [sys.executable, "-m", "neoq_anyio", "worker", "cli_app:setup", "--loop", loop]
    async with running(command, env=_env(dsn, app), cwd=app) as child:
        yield child


async def _enqueue(dsn: str, mode: str) -> str:
    async with open_backend(dsn) as nq:
        return await nq.enqueue(Job("cli", {"mode": mode}))


async def _status(db: Database, job_id: str) -> Any:
    return await db.value("SELECT status::text FROM neoq_jobs WHERE id = %s", (int(job_id),))


async def test_worker_processes_jobs_and_stops_cleanly_on_sigterm(
    app: Path, dsn: str, db: Database, anyio_backend_name: str
) -> None:
    job_id = await _enqueue(dsn, "quick")
    async with worker(app, dsn, anyio_backend_name) as child:
        await db.wait_for(
            f"SELECT status::text FROM neoq_jobs WHERE id = {int(job_id)}",
            lambda status: status == "processed",
            timeout=20,
        )
        child.signal(signal.SIGTERM)
        assert await child.exit_status() == 0, child.stderr
    assert "worker stopped" in child.stderr


async def test_first_signal_lets_the_job_in_flight_finish(
    app: Path, dsn: str, db: Database, anyio_backend_name: str
) -> None:
    job_id = await _enqueue(dsn, "release")
    async with worker(app, dsn, anyio_backend_name) as child:
        await wait_until(lambda: (app / f"started-{job_id}").exists(), timeout=20)
        child.signal(signal.SIGTERM)
        await child.wait_for_log("taking no more jobs")
        assert child.process.returncode is None  # waiting for the job in flight ...
        (app / "release").touch()  # ... which then finishes
        assert await child.exit_status() == 0, child.stderr
    assert await _status(db, job_id) == "processed"


async def test_second_signal_cancels_the_job_which_stays_queued(
    app: Path, dsn: str, db: Database, anyio_backend_name: str
) -> None:
    job_id = await _enqueue(dsn, "forever")
    async with worker(app, dsn, anyio_backend_name) as child:
        await wait_until(lambda: (app / f"started-{job_id}").exists(), timeout=20)
        child.signal(signal.SIGTERM)
        await child.wait_for_log("taking no more jobs")
        child.signal(signal.SIGINT)
        assert await child.exit_status() == 1, child.stderr
    assert "Traceback" not in child.stderr
    row = await db.fetch(
        "SELECT status::text, retries, error FROM neoq_jobs WHERE id = %s", (int(job_id),)
    )
    assert row == [("new", 0, None)]  # untouched: it runs again later


@pytest.mark.parametrize(
    ("args", "env_dsn", "message"),
    [
        pytest.param(["worker", "no_such_module:setup"], True, "cannot import module", id="module"),
        pytest.param(["worker", "cli_app:missing"], True, "has no attribute", id="attribute"),
        pytest.param(["worker", "cli_app"], True, "expected MODULE:FUNCTION", id="malformed"),
        pytest.param(["worker", "cli_app:APP_NAME"], True, "not an async function", id="not-async"),
        pytest.param(["worker", "cli_app:setup"], False, "pass --dsn or set NEOQ_DSN", id="no-dsn"),
        pytest.param(["enqueue", "q", "{nope"], True, "not valid JSON", id="bad-json"),
        pytest.param(["worker", "--dsn", "mysql://x", "cli_app:setup"], False, "scheme", id="dsn"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    app: Path, args: list[str], env_dsn: bool, message: str
) -> None:
    (app / "cli_app.py").write_text(APP + "\nAPP_NAME = 'cli'\n")
    env = {**os.environ, "MARKS": str(app)}
    env.pop("NEOQ_DSN", None)
    if env_dsn:
        env["NEOQ_DSN"] = "postgresql://127.0.0.1:1/unused"
    result = subprocess.run(
        [sys.executable, "-m", "neoq_anyio", *args],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("neoq-anyio: error:")
    assert message in lines[0]


def test_help_names_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "neoq_anyio", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for command in ("worker", "migrate", "enqueue", "stats", "jobs", "queues", "prune"):
        assert command in result.stdout


async def test_migrate_then_enqueue(dsn: str, db: Database) -> None:
    env = {**os.environ, "NEOQ_DSN": dsn}
    migrated = await anyio.run_process([sys.executable, "-m", "neoq_anyio", "migrate"], env=env)
    assert b"up to date" in migrated.stdout
    assert await db.value("SELECT count(*) FROM neoq_anyio_migrations") == 1
    queued = await anyio.run_process(
        [sys.executable, "-m", "neoq_anyio", "enqueue", "mail", '{"to": "ada"}', "--delay", "60"],
        env=env,
    )
    job_id = queued.stdout.decode().strip()
    row = await db.fetch(
        "SELECT queue, payload->>'to', run_after > now() + interval '50 seconds' "
        "FROM neoq_jobs WHERE id = %s",
        (int(job_id),),
    )
    assert row == [("mail", "ada", True)]


async def _cli(dsn: str, *args: str, check: bool = True) -> tuple[int, str, str]:
    """Run ``neoq-anyio ARGS`` against ``dsn``; exit status, stdout, stderr."""
    result = await anyio.run_process(
        [sys.executable, "-m", "neoq_anyio", *args],
        env={**os.environ, "NEOQ_DSN": dsn},
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr.decode()
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_jobs_commands_manage_jobs_as_json(dsn: str) -> None:
    async def fail(job: Job) -> None:
        raise KeyError("boom")

    async with open_backend(dsn) as nq:
        await nq.start(Handler("doomed", fail))
        dead_id = await nq.enqueue(Job("doomed", {"n": 1}, max_retries=0))
        live_id = await nq.enqueue(
            Job("later", {"n": 2}, run_after=datetime.now(UTC) + timedelta(hours=1))
        )
        await drain(nq)

    _, out, _ = await _cli(dsn, "jobs", "list", "--json")
    listed = json.loads(out)
    assert [job["id"] for job in listed] == [live_id, dead_id]
    assert set(listed[0]) == {
        "id",
        "queue",
        "status",
        "payload",
        "retries",
        "max_retries",
        "priority",
        "run_after",
        "ran_at",
        "created_at",
        "error",
    }
    _, out, _ = await _cli(dsn, "jobs", "list", "--status", "dead", "--json")
    assert [job["id"] for job in json.loads(out)] == [dead_id]

    _, out, _ = await _cli(dsn, "jobs", "show", dead_id, "--json")
    shown = json.loads(out)
    assert (shown["status"], shown["error"], shown["payload"]) == (
        "dead",
        "KeyError: 'boom'",
        {"n": 1},
    )

    _, out, _ = await _cli(dsn, "stats", "--json")
    stats = {row["queue"]: row for row in json.loads(out)}
    assert (stats["doomed"]["dead"], stats["later"]["scheduled"]) == (1, 1)

    _, out, _ = await _cli(dsn, "jobs", "retry", dead_id, "--json")
    assert (json.loads(out)["id"], json.loads(out)["status"]) == (dead_id, "new")
    _, out, _ = await _cli(dsn, "jobs", "cancel", live_id, "--json")
    assert json.loads(out) == {"id": live_id, "cancelled": True}
    _, out, _ = await _cli(dsn, "jobs", "delete", live_id)
    assert f"job {live_id} deleted" in out

    for args in (
        ("jobs", "show", "999999"),
        ("jobs", "retry", "999999"),
        ("jobs", "cancel", "999999"),
    ):
        status, out, err = await _cli(dsn, *args, check=False)
        assert status == 1, err
        assert err.startswith("neoq-anyio: error:"), err
        assert len(err.strip().splitlines()) == 1, err


async def test_prune_deletes_old_jobs(dsn: str) -> None:
    async with open_backend(dsn, keep_processed=None) as nq:
        await nq.start(Handler("ok", _noop))
        await nq.enqueue(Job("ok", {}))
        await drain(nq)
    _, out, _ = await _cli(dsn, "prune", "--json")  # default retention: a day
    assert json.loads(out) == {"processed": 0, "dead": 0}
    _, out, _ = await _cli(dsn, "prune", "--older-than", "0s", "--json")
    assert json.loads(out) == {"processed": 1, "dead": 0}
    status, _, err = await _cli(dsn, "prune", "--older-than", "soon", check=False)
    assert status == 2, err


async def _noop(job: Job) -> None:
    pass
