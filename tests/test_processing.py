"""Enqueue and processing on the PostgreSQL backend: the happy path and its rules."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import anyio
import pytest

from neoq_anyio import (
    ConfigurationError,
    DuplicateJobError,
    Handler,
    InvalidJobError,
    Job,
    NoJobError,
    NoQueueError,
    NoTransactionError,
    PostgresBackend,
    current_job,
    current_transaction,
    open_backend,
)

from .conftest import Database, wait_until

FAST: dict[str, Any] = {
    "job_check_interval": 0.05,
    "pending_job_check_interval": 0.5,
    "shutdown_timeout": 2,
}


@asynccontextmanager
async def backend(dsn: str, **options: Any) -> AsyncIterator[PostgresBackend]:
    async with open_backend(dsn, **{**FAST, **options}) as nq:
        yield nq


class Recorder:
    """A handler that records the jobs it ran and signals each run."""

    def __init__(self, expected: int = 1) -> None:
        self.jobs: list[Job] = []
        self.expected = expected
        self.done = anyio.Event()

    async def __call__(self, job: Job) -> None:
        self.jobs.append(job)
        if len(self.jobs) >= self.expected:
            self.done.set()

    async def wait(self, timeout: float = 10) -> None:
        with anyio.fail_after(timeout):
            await self.done.wait()


async def test_enqueued_job_is_processed(dsn: str, db: Database) -> None:
    rec = Recorder()
    async with backend(dsn) as nq:
        await nq.start(Handler("emails", rec))
        job_id = await nq.enqueue(Job("emails", {"to": "ada@example.com"}))
        await rec.wait()
        job = rec.jobs[0]
        assert isinstance(job_id, str)
        assert job.id == job_id
        assert job.payload == {"to": "ada@example.com"}
        assert job.queue == "emails"
        assert job.status == "new"
        assert job.retries == 0
        assert job.created_at is not None
        assert job.created_at.utcoffset() == timedelta(0)
        row = await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {int(job_id)}", lambda s: s == "processed"
        )
        assert row == "processed"
        ran_at, error = (
            await db.fetch(f"SELECT ran_at, error FROM neoq_jobs WHERE id = {job_id}")
        )[0]
        assert ran_at is not None
        assert error is None


async def test_jobs_enqueued_before_start_are_run(dsn: str) -> None:
    rec = Recorder(expected=5)
    async with backend(dsn) as nq:
        for n in range(5):
            await nq.enqueue(Job("backlog", {"n": n}))
        await nq.start(Handler("backlog", rec))
        await rec.wait()
    assert sorted(j.payload["n"] for j in rec.jobs if j.payload) == list(range(5))


async def test_backlog_runs_at_full_concurrency(dsn: str) -> None:
    running = 0
    peak = 0
    release = anyio.Event()
    started = Recorder(expected=4)

    async def handle(job: Job) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await started(job)
        await release.wait()
        running -= 1

    async with backend(dsn + " pool_max_conns=8") as nq:
        for n in range(10):
            await nq.enqueue(Job("wide", {"n": n}))
        await nq.start(Handler("wide", handle, concurrency=4))
        await started.wait()
        assert nq.statistics().jobs_in_flight == 4
        release.set()
    assert peak == 4


async def test_job_without_queue_is_refused(dsn: str, db: Database) -> None:
    async with backend(dsn) as nq:
        with pytest.raises(NoQueueError):
            await nq.enqueue(Job("", {"a": 1}))
        assert await db.value("SELECT count(*) FROM neoq_jobs") == 0


BAD_PAYLOADS: dict[str, Any] = {
    "set": {"a": {1, 2}},
    "nan": {"a": float("nan")},
    "object": {"a": object()},
    "bytes": {"a": b"bytes"},
    "list-not-object": [1, 2],
    "str-not-object": "text",
}


@pytest.mark.parametrize("kind", list(BAD_PAYLOADS))
async def test_non_json_payload_is_refused(dsn: str, db: Database, kind: str) -> None:
    async with backend(dsn) as nq:
        with pytest.raises(InvalidJobError, match="payload"):
            await nq.enqueue(Job("q", BAD_PAYLOADS[kind]))
        assert await db.value("SELECT count(*) FROM neoq_jobs") == 0


@pytest.mark.parametrize(
    "job",
    [
        pytest.param(Job("q", run_after=datetime(2030, 1, 1)), id="naive-run_after"),
        pytest.param(Job("q", deadline=datetime(2030, 1, 1)), id="naive-deadline"),
        pytest.param(Job("q", max_retries=-1), id="negative-max_retries"),
    ],
)
async def test_invalid_job_fields_are_refused(dsn: str, db: Database, job: Job) -> None:
    async with backend(dsn) as nq:
        with pytest.raises(InvalidJobError):
            await nq.enqueue(job)
        assert await db.value("SELECT count(*) FROM neoq_jobs") == 0


async def test_duplicate_unprocessed_job_is_refused(dsn: str, db: Database) -> None:
    async with backend(dsn) as nq:
        first = await nq.enqueue(Job("dups", {"k": 1}))
        with pytest.raises(DuplicateJobError):
            await nq.enqueue(Job("dups", {"k": 1}))
        # Same payload on another queue, or another payload: not duplicates.
        await nq.enqueue(Job("dups2", {"k": 1}))
        await nq.enqueue(Job("dups", {"k": 2}))
        # An explicit fingerprint decides.
        await nq.enqueue(Job("dups", {"k": 3}, fingerprint="fixed"))
        with pytest.raises(DuplicateJobError):
            await nq.enqueue(Job("dups", {"k": 4}, fingerprint="fixed"))
        assert await db.value("SELECT count(*) FROM neoq_jobs") == 4
        # Once processed, the same job may be enqueued again.
        rec = Recorder()
        await nq.start(Handler("dups", rec, concurrency=1))
        await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {first}", lambda s: s == "processed"
        )
        await nq.enqueue(Job("dups", {"k": 1}))


async def test_duplicate_inside_callers_transaction_keeps_it_usable(dsn: str, db: Database) -> None:
    async with backend(dsn) as nq:
        await nq.enqueue(Job("dups", {"k": 1}))
        async with nq.connection() as conn:
            with pytest.raises(DuplicateJobError):
                await nq.enqueue(Job("dups", {"k": 1}), connection=conn)
            # The caller's transaction was not aborted by the duplicate.
            await nq.enqueue(Job("dups", {"k": 2}), connection=conn)
        assert await db.value("SELECT count(*) FROM neoq_jobs") == 2


async def test_fingerprint_is_go_neoqs_md5(dsn: str, db: Database) -> None:
    async with backend(dsn) as nq:
        job_id = await nq.enqueue(Job("fp", {"b": 1, "a": "x"}))
    # md5("fp" + '{"a":"x","b":1}'), as Go's json.Marshal writes the payload.
    import hashlib

    expected = hashlib.md5(b'fp{"a":"x","b":1}').hexdigest()
    assert await db.value(f"SELECT fingerprint FROM neoq_jobs WHERE id = {job_id}") == expected


async def test_enqueue_in_callers_transaction(dsn: str, db: Database) -> None:
    rec = Recorder()
    async with backend(dsn) as nq:
        await nq.start(Handler("tx", rec))
        with pytest.raises(RuntimeError):
            async with nq.connection() as conn:
                await nq.enqueue(Job("tx", {"n": "rolled back"}), connection=conn)
                raise RuntimeError("abort the caller's transaction")
        assert await db.value("SELECT count(*) FROM neoq_jobs") == 0
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE orders (id int)")
            await conn.execute("INSERT INTO orders VALUES (1)")
            await nq.enqueue(Job("tx", {"n": "committed"}), connection=conn)
            # Not visible to others before the caller commits.
            assert await db.value("SELECT count(*) FROM neoq_jobs") == 0
        await rec.wait()
        assert rec.jobs[0].payload == {"n": "committed"}
        assert await db.value("SELECT count(*) FROM orders") == 1


async def test_handler_writes_commit_with_the_job(dsn: str, db: Database) -> None:
    rec = Recorder(expected=2)

    async def handle(job: Job) -> None:
        conn = current_transaction()
        assert current_job() is job
        await conn.execute("INSERT INTO effects (n) VALUES (%s)", ((job.payload or {})["n"],))
        await rec(job)
        if (job.payload or {})["n"] == 2:
            raise ValueError("second job fails after writing")

    async with backend(dsn) as nq:
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE effects (n int)")
        await nq.start(Handler("fx", handle, concurrency=1))
        await nq.enqueue(Job("fx", {"n": 1}))
        await nq.enqueue(Job("fx", {"n": 2}))
        await rec.wait()
        await db.wait_for("SELECT count(*) FROM neoq_jobs WHERE status <> 'new'", lambda n: n == 2)
        assert await db.fetch("SELECT n FROM effects") == [(1,)]
        rows = await db.fetch("SELECT payload->>'n', status, error FROM neoq_jobs ORDER BY id")
        assert rows[0] == ("1", "processed", None)
        assert rows[1][:2] == ("2", "failed")
        assert rows[1][2] == "ValueError: second job fails after writing"


async def test_context_outside_a_job_raises() -> None:
    with pytest.raises(NoJobError):
        current_job()
    with pytest.raises(NoTransactionError):
        current_transaction()


async def test_context_is_visible_in_tasks_the_handler_starts(dsn: str) -> None:
    seen: list[str | None] = []
    rec = Recorder()

    async def handle(job: Job) -> None:
        async def child() -> None:
            seen.append(current_job().id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
        await rec(job)

    async with backend(dsn) as nq:
        await nq.start(Handler("ctx", handle))
        job_id = await nq.enqueue(Job("ctx"))
        await rec.wait()
    assert seen == [job_id]


async def test_null_payload_round_trips(dsn: str) -> None:
    rec = Recorder()
    async with backend(dsn) as nq:
        await nq.start(Handler("none", rec))
        await nq.enqueue(Job("none"))
        await rec.wait()
    assert rec.jobs[0].payload is None


async def test_second_handler_for_a_queue_is_refused(dsn: str) -> None:
    async with backend(dsn) as nq:
        await nq.start(Handler("once", Recorder()))
        with pytest.raises(ConfigurationError, match="already has a handler"):
            await nq.start(Handler("once", Recorder()))
        with pytest.raises(ConfigurationError, match="no queue"):
            await nq.start(Handler("", Recorder()))


async def test_session_settings(dsn: str) -> None:
    settings: dict[str, str] = {}
    rec = Recorder()

    async def handle(job: Job) -> None:
        conn = current_transaction()
        for name in ("synchronous_commit", "idle_in_transaction_session_timeout", "TimeZone"):
            cur = await conn.execute(f"SHOW {name}".encode())
            row = await cur.fetchone()
            assert row is not None
            settings[name] = row[0]
        await rec(job)

    async with backend(dsn, transaction_timeout=12) as nq:
        await nq.start(Handler("settings", handle, job_timeout=10))
        await nq.enqueue(Job("settings"))
        await rec.wait()
    assert settings == {
        "synchronous_commit": "off",
        "idle_in_transaction_session_timeout": "13200ms",  # 12 s + 10 %: room to record
        "TimeZone": "UTC",
    }
    settings.clear()
    rec = Recorder()
    async with backend(dsn, synchronous_commit=True) as nq:
        await nq.start(Handler("settings", handle))
        await nq.enqueue(Job("settings", {"again": True}))
        await rec.wait()
    assert settings["synchronous_commit"] == "on"


async def test_set_logger(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()

    async def handle(job: Job) -> None:
        await rec(job)
        raise ValueError("logged elsewhere")

    custom = logging.getLogger("my.app.jobs")
    async with backend(dsn) as nq:
        nq.set_logger(custom)
        await nq.start(Handler("log", handle))
        with caplog.at_level(logging.ERROR, logger="my.app.jobs"):
            await nq.enqueue(Job("log"))
            await rec.wait()
            await wait_until(lambda: any(r.name == "my.app.jobs" for r in caplog.records))
    record = next(r for r in caplog.records if r.name == "my.app.jobs")
    assert "logged elsewhere" in record.getMessage()


async def test_methods_after_shutdown_raise(dsn: str) -> None:
    from neoq_anyio import NeoqError

    async with backend(dsn) as nq:
        await nq.shutdown()
        with pytest.raises(NeoqError, match="shut down"):
            await nq.enqueue(Job("late"))
        with pytest.raises(NeoqError, match="shut down"):
            await nq.start(Handler("late", Recorder()))


async def test_pending_poller_finds_unannounced_jobs(dsn: str, db: Database) -> None:
    rec = Recorder()
    async with backend(dsn, pending_job_check_interval=0.2) as nq:
        await nq.start(Handler("quiet", rec))
        # No trigger, no notification: only the periodic poller can find it.
        await db.execute("ALTER TABLE neoq_jobs DISABLE TRIGGER announce_job")
        await db.execute(
            "INSERT INTO neoq_jobs (queue, fingerprint, payload) VALUES ('quiet', 'q', '{}')"
        )
        await rec.wait()


async def test_enqueue_from_a_session_east_of_utc_is_announced(dsn: str, db: Database) -> None:
    # Go neoq's trigger misses due jobs when the session's TimeZone is ahead
    # of UTC (the poller would find them only a minute later): neoq_anyio
    # announces them itself.
    from psycopg.generators import notifies

    heard: list[str] = []
    db.conn.add_notify_handler(lambda n: heard.append(n.channel))
    async with backend(dsn) as nq:
        await db.execute("LISTEN tokyo")
        async with nq.connection() as conn:
            await conn.execute("SET TimeZone = 'Asia/Tokyo'")
            await nq.enqueue(Job("tokyo", {"n": 1}), connection=conn)
        with anyio.fail_after(5):
            while not heard:
                await db.conn.wait(notifies(db.conn.pgconn))
    assert heard[0] == "tokyo"


async def test_enqueue_with_a_plain_psycopg_connection_on_asyncio(
    dsn: str, db: Database, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    if anyio_backend[0] != "asyncio":
        pytest.skip("psycopg's own AsyncConnection waits through asyncio only")
    import psycopg

    async with backend(dsn) as nq:
        conn = await psycopg.AsyncConnection.connect(dsn)
        async with conn:
            await nq.enqueue(Job("plain", {"n": 1}), connection=conn)
            assert await db.value("SELECT count(*) FROM neoq_jobs") == 0  # not committed yet
        assert await db.value("SELECT count(*) FROM neoq_jobs") == 1
