"""Recording a job's outcome never loops.

When the job's own transaction cannot record what its run led to (its
session ended, its COMMIT broke a deferred constraint, the failure's row
would collide with a twin, the error text is not storable), the run is still
recorded, once: the job does not run again every second, repeating its side
effects. Each test counts the handler's runs and checks the job's row.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import anyio
import pytest

from neoq_anyio import Handler, Job, current_transaction
from neoq_anyio._outcome import (
    MAX_ERROR_CHARS,
    Outcome,
    after_failed_record,
    decide,
    describe_error,
    hold_back_seconds,
    storable_text,
)
from neoq_anyio._postgres._sql import idle_timeout_ms

from .conftest import Database, wait_until
from .test_processing import backend

# -- the pure rules ------------------------------------------------------------------


class _BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def test_error_text_is_always_storable() -> None:
    assert describe_error(ValueError("a\x00b")) == "ValueError: a\\x00b"
    assert describe_error(ValueError("x\ud800y")) == "ValueError: x\\ud800y"
    assert describe_error(_BrokenStr()) == "_BrokenStr: <str() raised RuntimeError>"
    assert describe_error(KeyError("missing")) == "KeyError: 'missing'"
    assert describe_error(RuntimeError()) == "RuntimeError"
    for text in (describe_error(ValueError("\x00\ud800")), storable_text("\udcff")):
        text.encode()  # encodable, so PostgreSQL takes it
        assert "\x00" not in text


def test_long_error_text_is_cut() -> None:
    text = describe_error(ValueError("x" * (3 * MAX_ERROR_CHARS)))
    assert len(text) < MAX_ERROR_CHARS + 50
    assert text.endswith(f"... ({2 * MAX_ERROR_CHARS + len('ValueError: ')} more characters)")


def test_a_success_that_cannot_be_recorded_is_a_failure() -> None:
    job = Job("q")._evolve(retries=2)
    lost = RuntimeError("commit failed")
    failed = after_failed_record(job, decide(job, None), lost)
    assert (failed.kind, failed.retries, failed.error) == (
        "retry",
        2,
        "RuntimeError: commit failed",
    )
    assert failed.delay > 0
    retry = decide(job, KeyError("k"))
    assert after_failed_record(job, retry, lost) is retry
    dead = Outcome("dead", 0, "late", ran=False)
    assert after_failed_record(job, dead, lost) is dead


def test_hold_back_doubles_up_to_ten_minutes() -> None:
    assert [hold_back_seconds(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert hold_back_seconds(10) == 512
    assert hold_back_seconds(11) == hold_back_seconds(1000) == 600


def test_idle_timeout_leaves_room_to_record_a_timeout() -> None:
    assert idle_timeout_ms(0) == 0  # no bound stays no bound
    assert idle_timeout_ms(1) == 2000  # at least 1 s more
    assert idle_timeout_ms(30) == 33000  # 10 % more
    assert idle_timeout_ms(0.25) == 1250


# -- against PostgreSQL --------------------------------------------------------------


async def status_of(db: Database, job_id: str) -> tuple[str, int, str | None, datetime]:
    [(status, retries, error, run_after)] = await db.fetch(
        "SELECT status::text, retries, error, run_after FROM neoq_jobs WHERE id = %s",
        (int(job_id),),
    )
    return status, retries, error, run_after


async def test_unstorable_error_texts_are_recorded_once(dsn: str, db: Database) -> None:
    runs: Counter[str] = Counter()
    errors = {
        "nul": ValueError("bad\x00byte"),
        "surrogate": ValueError("lone \ud800 surrogate"),
        "broken": _BrokenStr(),
    }

    async def handle(job: Job) -> None:
        kind = (job.payload or {})["kind"]
        runs[kind] += 1
        raise errors[kind]

    async with backend(dsn) as nq:
        await nq.start(Handler("texts", handle, concurrency=3))
        ids = {kind: await nq.enqueue(Job("texts", {"kind": kind})) for kind in errors}
        await db.wait_for(
            "SELECT count(*) FROM neoq_jobs WHERE status = 'failed'", lambda n: n == 3
        )
    stored = {kind: (await status_of(db, job_id))[2] for kind, job_id in ids.items()}
    assert stored == {
        "nul": "ValueError: bad\\x00byte",
        "surrogate": "ValueError: lone \\ud800 surrogate",
        "broken": "_BrokenStr: <str() raised RuntimeError>",
    }
    assert runs == {"nul": 1, "surrogate": 1, "broken": 1}


async def test_commit_broken_by_a_deferred_constraint_is_a_recorded_failure(
    dsn: str, db: Database
) -> None:
    runs = 0

    async def handle(job: Job) -> None:
        nonlocal runs
        runs += 1
        # Accepted now, refused at COMMIT: there is no parent 42.
        await current_transaction().execute("INSERT INTO child (parent_id) VALUES (42)")

    async with backend(dsn) as nq:
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE parent (id int PRIMARY KEY)")
            await conn.execute(
                "CREATE TABLE child (parent_id int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)"
            )
        await nq.start(Handler("deferred", handle))
        before = datetime.now(UTC)
        job_id = await nq.enqueue(Job("deferred"))
        await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {int(job_id)}", lambda s: s == "failed"
        )
        _, retries, error, run_after = await status_of(db, job_id)
    assert error is not None
    assert error.startswith("DatabaseError: cannot commit job")
    assert "violates foreign key constraint" in error
    assert retries == 0
    assert run_after > before + timedelta(seconds=15)  # Go neoq's backoff applies
    assert await db.value("SELECT count(*) FROM child") == 0
    assert runs == 1


async def test_failure_colliding_with_a_failed_twin_is_recorded(dsn: str, db: Database) -> None:
    runs: list[Job] = []
    again = anyio.Event()

    async def handle(job: Job) -> None:
        runs.append(job)
        if len(runs) == 1:
            raise RuntimeError("first run fails")
        again.set()

    async with backend(dsn) as nq:
        # A failed job waiting for its retry, and its twin (same queue and
        # fingerprint), new: neoq's unique index allows both, but not the
        # twin's failure beside the first.
        await db.execute(
            "INSERT INTO neoq_jobs (queue, fingerprint, payload, status, run_after) "
            "VALUES ('twins', 'same', '{}', 'failed', now() + interval '1 hour')"
        )
        twin = await nq.enqueue(Job("twins", {"n": 2}, fingerprint="same"))
        await nq.start(Handler("twins", handle))
        error = await db.wait_for(
            f"SELECT error FROM neoq_jobs WHERE id = {int(twin)}", lambda e: e is not None
        )
        assert error == "RuntimeError: first run fails"
        status, retries, _, run_after = await status_of(db, twin)
        # It keeps its status (the index allows nothing else), and its retries
        # count this run as a failed job's next run would.
        assert (status, retries) == ("new", 1)
        assert run_after > datetime.now(UTC) + timedelta(seconds=10)
        await db.execute(f"UPDATE neoq_jobs SET run_after = now() WHERE id = {int(twin)}")
        with anyio.fail_after(10):
            await again.wait()
        await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {int(twin)}", lambda s: s == "processed"
        )
        assert (await status_of(db, twin))[1] == 1
    assert [j.retries for j in runs] == [0, 1]
    assert await db.value("SELECT count(*) FROM neoq_jobs WHERE status = 'failed'") == 1


async def test_timeout_equal_to_transaction_timeout_is_recorded(dsn: str, db: Database) -> None:
    runs = 0

    async def handle(job: Job) -> None:
        nonlocal runs
        runs += 1
        await anyio.sleep_forever()  # idle in its transaction until the timeout

    async with backend(dsn, transaction_timeout=1) as nq:
        await nq.start(Handler("patience", handle, job_timeout=1))
        job_id = await nq.enqueue(Job("patience"))
        await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {int(job_id)}",
            lambda s: s == "failed",
        )
        _, retries, error, _ = await status_of(db, job_id)
    assert error is not None
    assert error.startswith("JobTimeoutError")
    assert retries == 0
    assert runs == 1


async def test_job_whose_session_died_is_recorded_in_a_new_transaction(
    dsn: str, db: Database
) -> None:
    runs: Counter[str] = Counter()

    async def handle(job: Job) -> None:
        runs[job.id or ""] += 1
        # The job's own session ends: its transaction cannot record anything.
        await current_transaction().execute("SELECT pg_terminate_backend(pg_backend_pid())")

    async with backend(dsn) as nq:
        # Idle workers beside them: none may take a job while its row is
        # unlocked, before its run is recorded (another process might, as
        # after a crash).
        await nq.start(Handler("doomed", handle, concurrency=4))
        before = datetime.now(UTC)
        retried = await nq.enqueue(Job("doomed", {"n": 1}))
        buried = await nq.enqueue(Job("doomed", {"n": 2}, max_retries=0))
        await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {int(retried)}", lambda s: s == "failed"
        )
        await db.wait_for(
            f"SELECT count(*) FROM neoq_dead_jobs WHERE id = {int(buried)}", lambda n: n == 1
        )
        _, retries, error, run_after = await status_of(db, retried)
        [(dead_error,)] = await db.fetch("SELECT error FROM neoq_dead_jobs")
    assert error is not None
    assert "terminating connection" in error
    assert retries == 0
    assert run_after > before + timedelta(seconds=15)
    assert "terminating connection" in dead_error
    assert await db.value(f"SELECT count(*) FROM neoq_jobs WHERE id = {int(buried)}") == 0
    assert runs == {retried: 1, buried: 1}


async def test_job_that_cannot_be_recorded_at_all_is_held_back(
    dsn: str, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[tuple[str, float]] = []

    async def handle(job: Job) -> None:
        runs.append(((job.payload or {})["name"], anyio.current_time()))

    async with backend(dsn) as nq:
        # Nothing can change the poison job's row, in any transaction.
        async with nq.connection() as conn:
            await conn.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'this row stays as it is'; END $$"
            )
            await conn.execute(
                "CREATE TRIGGER refuse BEFORE UPDATE ON neoq_jobs FOR EACH ROW "
                "WHEN (OLD.payload->>'name' = 'poison') EXECUTE FUNCTION refuse()"
            )
        await nq.enqueue(Job("stuck", {"name": "poison"}))
        healthy = await nq.enqueue(Job("stuck", {"name": "healthy"}))
        # One worker: before the fix it took the poison job, first in line,
        # every second, and the healthy one never ran.
        await nq.start(Handler("stuck", handle, concurrency=1))
        await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {int(healthy)}",
            lambda s: s == "processed",
        )
        await wait_until(lambda: [name for name, _ in runs].count("poison") == 2)
    poison = [at for name, at in runs if name == "poison"]
    assert [name for name, _ in runs][:2] == ["poison", "healthy"]
    assert poison[1] - poison[0] >= 0.9  # held back for 1 s, then 2 s, ...
    assert any("leaves it alone for 1 s" in r.getMessage() for r in caplog.records)
