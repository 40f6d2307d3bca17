"""Paused queues: ``pause_queue`` / ``resume_queue`` on both backends and both
execution modes, across backends sharing a database, across restarts, and
from the command line (as real subprocesses).

That nothing starts while a queue is paused can only be shown by waiting:
those waits are bounded waits for the handler's "started" event
(``Gate.starts_within``), long enough for several wake-ups (notifications,
``job_check_interval``, the pending-job poller) to have come and gone.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import pytest

from neoq_anyio import (
    Backend,
    ConfigurationError,
    Handler,
    Job,
    NeoqError,
    open_backend,
)
from neoq_anyio._postgres._leases import LeaseStore
from neoq_anyio._postgres._store import JobStore
from neoq_anyio.testing import drain

from . import test_cli

if TYPE_CHECKING:
    from neoq_anyio._models import Execution
from .conftest import Database, wait_until

FAST: dict[str, Any] = {
    "job_check_interval": 0.1,
    "pending_job_check_interval": 0.3,
    "shutdown_timeout": 2,
}
QUIET = 0.6  # seconds a paused queue is watched for a start that must not come


@pytest.fixture(params=["transaction", "lease"])
def execution(request: pytest.FixtureRequest) -> Execution:
    return cast("Execution", request.param)


class Gate:
    """A handler that records the jobs it starts and, unless opened, holds
    them until ``release``."""

    def __init__(self, *, open_: bool = False) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self._release = anyio.Event()
        if open_:
            self._release.set()
        self._changed = anyio.Event()

    async def __call__(self, job: Job) -> None:
        assert job.id is not None
        self.started.append(job.id)
        self._signal()
        await self._release.wait()
        self.finished.append(job.id)
        self._signal()

    def release(self) -> None:
        self._release.set()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_started(self, count: int, timeout: float = 10) -> None:
        with anyio.fail_after(timeout):
            while len(self.started) < count:
                await self._changed.wait()

    async def wait_finished(self, count: int, timeout: float = 10) -> None:
        with anyio.fail_after(timeout):
            while len(self.finished) < count:
                await self._changed.wait()

    async def starts_within(self, seconds: float) -> bool:
        """Whether another job starts within ``seconds``."""
        before = len(self.started)
        with anyio.move_on_after(seconds):
            while len(self.started) == before:
                await self._changed.wait()
            return True
        return False


class LogWatch(logging.Handler):
    """The messages a backend logs, on a logger of the test's own."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.logger = logging.getLogger(f"neoq_anyio.tests.pause.{uuid.uuid4().hex}")
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def said(self, text: str) -> bool:
        return any(text in message for message in self.messages)

    def close(self) -> None:
        self.logger.removeHandler(self)
        super().close()


@pytest.fixture
def log_watch() -> Iterator[LogWatch]:
    watch = LogWatch()
    yield watch
    watch.close()


async def _stats(nq: Backend, queue: str) -> Any:
    found = [stat for stat in await nq.queue_stats() if stat.queue == queue]
    assert found, f"queue {queue} not in queue_stats()"
    return found[0]


# -- one process ---------------------------------------------------------------------------


async def test_a_paused_queue_takes_no_jobs_until_resumed(
    connection_string: str, execution: Execution
) -> None:
    gate = Gate(open_=True)
    async with open_backend(connection_string, **FAST) as nq:
        await nq.start(Handler("work", gate, execution=execution, concurrency=4))
        await nq.enqueue(Job("work", {"n": -1}))
        await gate.wait_started(1)  # the queue works ...
        await drain(nq)

        await nq.pause_queue("work")
        for n in range(5):  # ... enqueueing into a paused queue works: the jobs wait
            await nq.enqueue(Job("work", {"n": n}))
        assert not await gate.starts_within(QUIET)
        stats = await _stats(nq, "work")
        assert (stats.paused, stats.due, stats.processed) == (True, 5, 1)
        with anyio.fail_after(5):
            await drain(nq)  # a paused queue's due jobs are not waited for

        await nq.resume_queue("work")
        await gate.wait_finished(6)
        await drain(nq)
        stats = await _stats(nq, "work")
        assert (stats.paused, stats.due, stats.processed) == (False, 0, 6)


async def test_a_take_under_way_stops_at_a_pause_between_its_statements(
    dsn: str, execution: Execution, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A take that finds nothing ahead of the watermark looks behind it in a
    # second statement. Sent after pause_queue() returned, that one could
    # take jobs enqueued after it: the pause must end the take in between.
    # (Here the pause is injected between the two statements.)
    gate = Gate(open_=True)
    armed, paused = anyio.Event(), anyio.Event()

    async def pause_once(position: object, behind: bool) -> None:
        if armed.is_set() and position is not None and not behind and not paused.is_set():
            await nq.pause_queue("work")
            paused.set()

    def pause_after(cls: type, name: str) -> None:
        # Both take the watermark's position fourth, and behind= by keyword.
        original = getattr(cls, name)

        async def wrapper(self: object, *args: Any, **kwargs: Any) -> Any:
            result = await original(self, *args, **kwargs)
            await pause_once(args[3] if len(args) > 3 else None, kwargs.get("behind", False))
            return result

        monkeypatch.setattr(cls, name, wrapper)

    if execution == "transaction":
        pause_after(JobStore, "_take_row")  # (conn, queue, skip, position)
    else:
        pause_after(LeaseStore, "claim")  # (queue, count, lease, position)

    # No pending-job sweep meanwhile: it would forget the watermark.
    async with open_backend(dsn, **{**FAST, "pending_job_check_interval": 60}) as nq:
        await nq.start(Handler("work", gate, execution=execution, concurrency=1))
        await nq.enqueue(Job("work", {"n": 0}))
        await gate.wait_finished(1)
        await drain(nq)  # the watermark is at job 0
        # A job behind the watermark (an older run_after): only the look behind finds it.
        armed.set()
        await nq.enqueue(Job("work", {"n": 1}, run_after=datetime.now(UTC) - timedelta(hours=1)))
        with anyio.fail_after(5):
            await paused.wait()
        assert not await gate.starts_within(QUIET)
        await nq.resume_queue("work")
        await gate.wait_finished(2)


async def test_jobs_running_as_the_queue_is_paused_finish_and_no_more_start(
    connection_string: str, execution: Execution
) -> None:
    gate = Gate()
    async with open_backend(connection_string, **FAST) as nq:
        await nq.start(Handler("work", gate, execution=execution, concurrency=3))
        await nq.enqueue_many([Job("work", {"n": n}) for n in range(10)])
        await gate.wait_started(3)

        await nq.pause_queue("work")
        gate.release()  # the three running finish normally ...
        await gate.wait_finished(3)
        assert not await gate.starts_within(QUIET)  # ... and no fourth starts
        await drain(nq)
        stats = await _stats(nq, "work")
        assert (stats.paused, stats.due, stats.processed) == (True, 7, 3)

        await nq.resume_queue("work")
        await gate.wait_finished(10)


async def test_pausing_before_the_handler_starts_holds_its_first_jobs(
    connection_string: str, execution: Execution
) -> None:
    gate = Gate(open_=True)
    async with open_backend(connection_string, **FAST) as nq:
        await nq.enqueue(Job("work", {}))
        await nq.pause_queue("work")
        await nq.start(Handler("work", gate, execution=execution))
        assert not await gate.starts_within(QUIET)
        await nq.resume_queue("work")
        await gate.wait_finished(1)


async def test_pause_and_resume_are_idempotent_and_listed(connection_string: str) -> None:
    async with open_backend(connection_string, **FAST) as nq:
        assert await nq.queue_stats() == []
        await nq.resume_queue("idle")  # not paused: nothing happens
        assert await nq.queue_stats() == []

        await nq.pause_queue("idle")
        await nq.pause_queue("idle")
        [stats] = await nq.queue_stats()  # paused, with no job at all
        assert stats.queue == "idle"
        assert stats.paused
        assert (stats.due, stats.scheduled, stats.running, stats.dead) == (0, 0, 0, 0)
        assert stats.oldest_due_seconds is None

        await nq.resume_queue("idle")
        await nq.resume_queue("idle")
        assert await nq.queue_stats() == []


@pytest.mark.parametrize("queue", ["", "   ", "q" * 64, 7])
async def test_a_bad_queue_name_is_refused(connection_string: str, queue: Any) -> None:
    async with open_backend(connection_string) as nq:
        with pytest.raises(ConfigurationError):
            await nq.pause_queue(queue)
        with pytest.raises(ConfigurationError):
            await nq.resume_queue(queue)


async def test_pause_after_shutdown_raises(connection_string: str) -> None:
    async with open_backend(connection_string) as nq:
        await nq.shutdown()
        with pytest.raises(NeoqError, match="shut down"):
            await nq.pause_queue("work")


async def test_shutdown_of_a_paused_queue_is_prompt(
    connection_string: str, execution: Execution
) -> None:
    gate = Gate(open_=True)
    with anyio.fail_after(5):
        async with open_backend(connection_string, **FAST) as nq:
            await nq.start(Handler("work", gate, execution=execution, concurrency=2))
            await nq.pause_queue("work")
            await nq.enqueue(Job("work", {}))
    assert gate.started == []


# -- PostgreSQL: stored, shared, restarts ------------------------------------------------


async def test_a_pause_outlasts_a_restart(dsn: str, db: Database, execution: Execution) -> None:
    async with open_backend(dsn, **FAST) as nq:  # no handler anywhere yet
        await nq.pause_queue("work")
        job_id = await nq.enqueue(Job("work", {}))
    assert await db.fetch("SELECT queue, paused FROM neoq_anyio_queues") == [("work", True)]

    gate = Gate(open_=True)
    async with open_backend(dsn, **FAST) as nq:
        await nq.start(Handler("work", gate, execution=execution))
        assert not await gate.starts_within(QUIET)
        assert (await _stats(nq, "work")).paused
        await nq.resume_queue("work")
        await gate.wait_finished(1)
    assert gate.started == [job_id]


@asynccontextmanager
async def _two_backends(
    dsn: str, watch: LogWatch, worker_options: dict[str, Any]
) -> AsyncIterator[tuple[Backend, Backend]]:
    """A worker process and an admin process, as two backends on one database."""
    async with (
        open_backend(dsn, logger=watch.logger, shutdown_timeout=2, **worker_options) as worker,
        open_backend(dsn, **FAST) as admin,
    ):
        yield worker, admin


@pytest.mark.parametrize(
    ("worker_options", "bound"),
    [
        # Listening: the announcement does it, so a job_check_interval far
        # longer than the bound shows the periodic read is not what did.
        pytest.param({"job_check_interval": 30}, 2.0, id="listening"),
        # Behind a transaction pooler without a LISTEN connection nothing is
        # announced: the periodic read (job_check_interval, 1 s by default)
        # must do it.
        pytest.param({"pooler": "transaction"}, 2.5, id="polling"),
    ],
)
async def test_a_pause_through_one_backend_stops_another_within_seconds(
    dsn: str,
    db: Database,
    execution: Execution,
    log_watch: LogWatch,
    worker_options: dict[str, Any],
    bound: float,
) -> None:
    gate = Gate(open_=True)
    async with _two_backends(dsn, log_watch, worker_options) as (worker, admin):
        await worker.start(Handler("work", gate, execution=execution, concurrency=2))

        await admin.pause_queue("work")
        await wait_until(lambda: log_watch.said("queue work paused"), timeout=bound)
        ids = await admin.enqueue_many([Job("work", {"n": n}) for n in range(3)])
        assert not await gate.starts_within(QUIET)
        assert await db.value("SELECT count(*) FROM neoq_jobs WHERE status = 'new'") == 3

        await admin.resume_queue("work")
        await wait_until(lambda: log_watch.said("queue work resumed"), timeout=bound)
        await gate.wait_finished(3, timeout=10)
        assert sorted(gate.started) == sorted(i for i in ids if i is not None)


async def test_a_pause_written_without_announcement_is_read_periodically(
    dsn: str, db: Database, log_watch: LogWatch
) -> None:
    # A lost notification: the row changes, nothing is announced.
    gate = Gate(open_=True)
    async with open_backend(
        dsn, logger=log_watch.logger, job_check_interval=0.2, shutdown_timeout=2
    ) as nq:
        await nq.start(Handler("work", gate))
        await db.execute("INSERT INTO neoq_anyio_queues (queue, paused) VALUES ('work', true)")
        await wait_until(lambda: log_watch.said("queue work paused"), timeout=2)
        await nq.enqueue(Job("work", {}))
        assert not await gate.starts_within(QUIET)
        await db.execute("UPDATE neoq_anyio_queues SET paused = false")
        await gate.wait_finished(1, timeout=2)


async def test_a_pause_unannounced_while_the_listener_was_down_is_read_on_reconnect(
    dsn: str, db: Database, schema_name: str, log_watch: LogWatch
) -> None:
    gate = Gate(open_=True)
    # The periodic read is 30 s away: only the reconnection can find the pause.
    async with open_backend(
        dsn, logger=log_watch.logger, job_check_interval=30, shutdown_timeout=2
    ) as nq:
        await nq.start(Handler("work", gate))
        await db.execute("INSERT INTO neoq_anyio_queues (queue, paused) VALUES ('work', true)")
        killed = await db.value(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s AND query LIKE 'LISTEN%%'",
            (schema_name,),
        )
        assert killed == 1  # the LISTEN connection
        await wait_until(lambda: log_watch.said("queue work paused"), timeout=5)
        assert nq.statistics().listener_reconnects == 1


async def test_a_paused_lease_queue_does_not_take_over_lost_leases(dsn: str, db: Database) -> None:
    gate = Gate(open_=True)
    async with open_backend(dsn, **FAST) as nq:
        job_id = await nq.enqueue(Job("orphan", max_retries=5))
        # A worker claimed it and died: its lease lapsed.
        await db.execute(
            "UPDATE neoq_jobs SET lease_token = 7, lease_expires_at = now() - interval '1 s' "
            f"WHERE id = {int(job_id)}"
        )
        await nq.pause_queue("orphan")
        # Expired leases are looked for every 0.1 s here.
        await nq.start(Handler("orphan", gate, execution="lease", lease_duration=1))
        assert not await gate.starts_within(QUIET)
        assert await db.value(f"SELECT lease_token FROM neoq_jobs WHERE id = {int(job_id)}") == 7
        await nq.resume_queue("orphan")
        await gate.wait_finished(1)
    assert gate.started == [job_id]


# -- the command line ----------------------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """test_cli's worker application: ``cli_app:setup`` runs queue ``cli``."""
    (tmp_path / "cli_app.py").write_text(test_cli.APP)
    return tmp_path


_cli = test_cli._cli  # ``neoq-anyio ARGS`` as a subprocess


async def test_queues_commands_pause_list_and_resume(dsn: str) -> None:
    _, out, _ = await _cli(dsn, "queues", "pause", "mail")
    assert out.strip() == "queue mail paused"
    _, out, _ = await _cli(dsn, "queues", "pause", "idle", "--json")
    assert json.loads(out) == {"queue": "idle", "paused": True}
    _, out, _ = await _cli(dsn, "enqueue", "other", "{}")

    _, out, _ = await _cli(dsn, "queues", "list", "--json")
    assert json.loads(out) == [
        {"queue": "idle", "paused": True},
        {"queue": "mail", "paused": True},
        {"queue": "other", "paused": False},
    ]
    _, out, _ = await _cli(dsn, "queues", "list")
    assert out.splitlines() == ["idle  paused", "mail  paused", "other  active"]
    _, out, _ = await _cli(dsn, "stats", "--json")
    assert {row["queue"]: row["paused"] for row in json.loads(out)} == {
        "idle": True,
        "mail": True,
        "other": False,
    }
    _, out, _ = await _cli(dsn, "stats")
    assert "(paused)" in next(line for line in out.splitlines() if line.startswith("mail"))

    _, out, _ = await _cli(dsn, "queues", "resume", "mail")
    assert out.strip() == "queue mail resumed"
    _, out, _ = await _cli(dsn, "queues", "resume", "idle", "--json")
    assert json.loads(out) == {"queue": "idle", "paused": False}
    _, out, _ = await _cli(dsn, "queues", "list", "--json")
    assert json.loads(out) == [{"queue": "other", "paused": False}]


async def test_queues_pause_refuses_a_bad_queue_name(dsn: str) -> None:
    status, _, err = await _cli(dsn, "queues", "pause", "q" * 64, check=False)
    assert status == 2, err
    assert err.startswith("neoq-anyio: error:"), err
    assert len(err.strip().splitlines()) == 1, err


async def test_a_worker_process_follows_pauses_from_the_command_line(
    app: Path, dsn: str, db: Database, anyio_backend_name: str
) -> None:
    async with test_cli.worker(app, dsn, anyio_backend_name) as child:
        await child.wait_for_log("queue cli started")
        await _cli(dsn, "queues", "pause", "cli")
        await child.wait_for_log("queue cli paused", timeout=2)
        _, out, _ = await _cli(dsn, "enqueue", "cli", '{"mode": "quick"}')
        job_id = out.strip()
        assert not await _started_within(app, job_id, QUIET)
        assert await db.value(f"SELECT status::text FROM neoq_jobs WHERE id = {int(job_id)}") == (
            "new"
        )
        await _cli(dsn, "queues", "resume", "cli")
        await db.wait_for(
            f"SELECT status::text FROM neoq_jobs WHERE id = {int(job_id)}",
            lambda status: status == "processed",
            timeout=10,
        )


async def _started_within(app: Path, job_id: str, seconds: float) -> bool:
    """Whether the CLI test app marks ``job_id`` started within ``seconds``."""
    with anyio.move_on_after(seconds):
        await wait_until(lambda: (app / f"started-{job_id}").exists(), timeout=seconds + 1)
        return True
    return False


# -- the dashboard -------------------------------------------------------------------------


async def test_the_dashboard_pauses_and_resumes_queues(connection_string: str) -> None:
    from neoq_anyio.web import create_app

    from .test_web import client, csrf_of

    with anyio.fail_after(30):
        async with open_backend(connection_string) as nq:
            await nq.enqueue(Job("a/b", {}))
            async with client(create_app(nq)) as c:
                csrf = await csrf_of(c, "/")
                page = (await c.get("/")).text
                assert 'data-paused="false"' in page
                assert 'action="/queues/a%2Fb/pause"' in page

                assert (await c.post("/queues/a%2Fb/pause")).status_code == 403  # no CSRF token
                assert not (await _stats(nq, "a/b")).paused

                paused = await c.post("/queues/a%2Fb/pause", data={"csrf": csrf})
                assert paused.status_code == 303
                assert paused.headers["location"] == "/"
                assert (await _stats(nq, "a/b")).paused
                page = (await c.get("/")).text
                assert 'data-paused="true"' in page
                assert 'action="/queues/a%2Fb/resume"' in page
                assert (await c.get("/api/stats")).json()["queues"][0]["paused"] is True

                resumed = await c.post("/queues/a%2Fb/resume", data={"csrf": csrf})
                assert resumed.status_code == 303
                assert not (await _stats(nq, "a/b")).paused

                bad = await c.post(f"/queues/{'q' * 64}/pause", data={"csrf": csrf})
                assert bad.status_code == 400


async def test_a_read_only_dashboard_neither_shows_nor_takes_pauses(
    connection_string: str,
) -> None:
    from neoq_anyio.web import create_app

    from .test_web import client

    with anyio.fail_after(30):
        async with open_backend(connection_string) as nq:
            await nq.enqueue(Job("work", {}))
            async with client(create_app(nq, read_only=True)) as c:
                page = (await c.get("/")).text
                assert "/queues/" not in page
                refused = await c.post("/queues/work/pause", data={"csrf": "x" * 43})
                assert refused.status_code == 403
            assert not (await _stats(nq, "work")).paused
