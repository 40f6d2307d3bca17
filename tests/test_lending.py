"""Connections lent to user code come back clean; busy workers never starve enqueue.

Two ways hand a pooled session to user code: ``nq.connection()`` and, inside a
job, ``current_transaction()``. Whatever the user changes on it (psycopg's row
factory and adapters, the session's settings, LISTENs, temporary tables,
advisory locks) must not reach the library's next query on that session, nor
the next borrower. Tests that check a session is reused run with
``pool_max_conns=1``, so that the next borrower gets the same session for sure.

Workers in transaction mode each hold a pooled connection while their job
runs; they never take the connections ``enqueue`` and ``nq.connection()``
need, and a pool whose size was not given grows to fit the handlers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.adapt import Loader
from psycopg.rows import dict_row, tuple_row

from neoq_anyio import Handler, Job, PostgresBackend, current_transaction, open_backend
from neoq_anyio._pg._pool import RESERVED_CONNS
from neoq_anyio._pg._pool_options import default_max_conns

from .conftest import Database, wait_until
from .test_processing import FAST


@asynccontextmanager
async def backend(dsn: str, **options: Any) -> AsyncIterator[PostgresBackend]:
    async with open_backend(dsn, **{**FAST, **options}) as nq:
        assert isinstance(nq, PostgresBackend)
        yield nq


class GarbageLoader(Loader):
    """A jsonb loader a user might register: here, one that ignores the data."""

    def load(self, data: Any) -> Any:
        return {"garbage": True}


async def one(conn: psycopg.AsyncConnection[Any], query: str) -> Any:
    cur = await conn.cursor(row_factory=tuple_row).execute(query.encode())
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def wait_processed(db: Database, job_id: str) -> None:
    await db.wait_for(f"SELECT status FROM neoq_jobs WHERE id = {int(job_id)}", "processed".__eq__)


# -- psycopg's side: row factory and adapters ------------------------------------------------


async def test_row_factory_and_loaders_set_in_a_lent_connection_do_not_leak(
    dsn: str, db: Database
) -> None:
    seen: list[Any] = []
    ran = anyio.Event()

    async def handle(job: Job) -> None:
        seen.append(job.payload)
        ran.set()

    async with backend(dsn + " pool_max_conns=1") as nq:
        async with nq.connection() as conn:
            pid = await one(conn, "SELECT pg_backend_pid()")
            conn.row_factory = dict_row  # type: ignore[assignment]
            conn.adapters.register_loader("jsonb", GarbageLoader)
            cur = await conn.execute("SELECT 1 AS n")
            assert await cur.fetchone() == {"n": 1}
        # The next enqueue and the next job run on that same session.
        job_id = await nq.enqueue(Job("after_lend", {"n": 1}))
        assert job_id.isdigit()
        await nq.start(Handler("after_lend", handle, concurrency=1))
        with anyio.fail_after(10):
            await ran.wait()
        await wait_processed(db, job_id)
        async with nq.connection() as again:
            assert await one(again, "SELECT pg_backend_pid()") == pid
            assert again is not conn
            assert again.row_factory is tuple_row
    assert seen == [{"n": 1}]


async def test_row_factory_set_on_current_transaction_does_not_break_the_backend(
    dsn: str, db: Database
) -> None:
    payloads: list[Any] = []
    pids: set[int] = set()
    done = anyio.Event()

    async def handle(job: Job) -> None:
        conn = current_transaction()
        pids.add(await one(conn, "SELECT pg_backend_pid()"))
        conn.row_factory = dict_row  # type: ignore[assignment]
        conn.adapters.register_loader("jsonb", GarbageLoader)
        cur = await conn.execute("SELECT %s::jsonb AS doc", ('{"a": 1}',))
        assert await cur.fetchone() == {"doc": {"garbage": True}}
        payloads.append(job.payload)
        if len(payloads) == 3:
            done.set()

    async with backend(dsn + " pool_max_conns=1") as nq:
        await nq.start(Handler("dirty", handle, concurrency=1))
        first = await nq.enqueue(Job("dirty", {"n": 0}))
        await wait_processed(db, first)
        # The handler's connection is the pool's only one: enqueue and the
        # next jobs' fetches use it after the handler changed it.
        ids = [await nq.enqueue(Job("dirty", {"n": n})) for n in (1, 2)]
        with anyio.fail_after(10):
            await done.wait()
        for job_id in ids:
            await wait_processed(db, job_id)
    assert payloads == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert len(pids) == 1


# -- the server's side: session state --------------------------------------------------------

DIRTY = (
    "SET statement_timeout = '123s'",
    "SET TimeZone = 'Asia/Tokyo'",
    "SET idle_in_transaction_session_timeout = '99s'",
    "CREATE TEMP TABLE scratch (n int)",
    "LISTEN lent_channel",
    "SELECT pg_advisory_lock(4242)",
    "PREPARE lent_statement AS SELECT 1",
)


IDLE_TIMEOUT = "SHOW idle_in_transaction_session_timeout"  # set by the library


async def dirty(conn: psycopg.AsyncConnection[Any]) -> tuple[int, str]:
    """Leave session state of every kind on ``conn``; returns its backend pid
    and the library's idle timeout it had."""
    idle_timeout = str(await one(conn, IDLE_TIMEOUT))
    for statement in DIRTY:
        await conn.execute(statement.encode())
    return int(await one(conn, "SELECT pg_backend_pid()")), idle_timeout


async def assert_clean(conn: psycopg.AsyncConnection[Any], idle_timeout: str) -> None:
    assert await one(conn, "SHOW statement_timeout") == "0"
    # The library's own session settings are back.
    assert await one(conn, "SHOW TimeZone") == "UTC"
    assert await one(conn, IDLE_TIMEOUT) == idle_timeout
    assert await one(conn, "SELECT to_regclass('pg_temp.scratch')") is None
    assert await one(conn, "SELECT count(*) FROM pg_listening_channels()") == 0
    held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    assert await one(conn, held) == 0
    assert await one(conn, "SELECT count(*) FROM pg_prepared_statements") == 0


async def test_session_state_left_in_a_lent_connection_does_not_survive(dsn: str) -> None:
    async with backend(dsn + " pool_max_conns=1") as nq:
        async with nq.connection() as conn:
            pid, idle_timeout = await dirty(conn)
        async with nq.connection() as again:
            assert await one(again, "SELECT pg_backend_pid()") == pid
            await assert_clean(again, idle_timeout)


async def test_session_state_left_by_a_handler_does_not_survive(dsn: str, db: Database) -> None:
    pids: list[tuple[int, str]] = []

    async def handle(job: Job) -> None:
        pids.append(await dirty(current_transaction()))

    async with backend(dsn + " pool_max_conns=1") as nq:
        await nq.start(Handler("dirty", handle, concurrency=1))
        await wait_processed(db, await nq.enqueue(Job("dirty")))
        [(pid, idle_timeout)] = pids
        async with nq.connection() as conn:
            assert await one(conn, "SELECT pg_backend_pid()") == pid
            await assert_clean(conn, idle_timeout)
    # The session's advisory lock went with the reset, not with the session.
    assert await db.value("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


async def test_a_connection_left_locked_is_never_handed_out(dsn: str) -> None:
    async with backend(dsn + " pool_max_conns=1") as nq:
        async with nq.connection() as conn:
            await conn.set_autocommit(True)
            pid = await one(conn, "SELECT pg_backend_pid()")
            await conn.execute("LISTEN lent_channel")
            await conn.execute("NOTIFY lent_channel, 'hello'")
            # Read one notification and stop, as `async for ...: break` does:
            # the generator keeps the connection's lock until it is closed.
            notifies = conn.notifies()
            assert (await anext(notifies)).payload == "hello"
        assert conn.lock.locked()
        try:
            with anyio.fail_after(10):
                async with nq.connection() as fresh:
                    assert fresh is not conn
                    assert await one(fresh, "SELECT pg_backend_pid()") != pid
                job_id = await nq.enqueue(Job("locked"))
            assert job_id.isdigit()
        finally:
            await notifies.aclose()


# -- synchronous_commit ----------------------------------------------------------------------


async def test_synchronous_commit_off_applies_to_the_library_only(dsn: str, db: Database) -> None:
    server_default = await db.value("SHOW synchronous_commit")
    assert server_default != "off"
    in_job: list[tuple[int, str]] = []

    async def handle(job: Job) -> None:
        conn = current_transaction()
        in_job.append(
            (await one(conn, "SELECT pg_backend_pid()"), await one(conn, "SHOW synchronous_commit"))
        )

    async with backend(dsn + " pool_max_conns=1") as nq:  # synchronous_commit=False
        for _ in range(2):  # the second time on a session reset after the first
            async with nq.connection() as conn:
                pid = await one(conn, "SELECT pg_backend_pid()")
                assert await one(conn, "SHOW synchronous_commit") == server_default
        # The same session, back in the library's hands: off again.
        await nq.start(Handler("sync", handle, concurrency=1))
        await wait_processed(db, await nq.enqueue(Job("sync")))
    assert in_job == [(pid, "off")]


# -- busy workers and the pool ---------------------------------------------------------------


async def test_enqueue_never_waits_for_busy_workers(dsn: str, db: Database) -> None:
    # Four connections, ten workers: the workers get two, enqueue the rest.
    release = anyio.Event()
    followed: list[str] = []
    jobs = 6

    async def busy(job: Job) -> None:
        await release.wait()
        # Every worker is busy, and this handler enqueues: no deadlock.
        followed.append(await nq.enqueue(Job("follow", {"after": job.id})))

    async with backend(dsn + " pool_max_conns=4", connection_timeout=3) as nq:
        await nq.start(Handler("busy", busy, concurrency=10))
        ids = [await nq.enqueue(Job("busy", {"n": n})) for n in range(jobs)]

        def workers_full() -> bool:
            stats = nq.statistics()
            assert stats.pool is not None
            return (
                stats.jobs_in_flight
                == stats.pool.worker_in_use
                == stats.pool.worker_max_size
                == 4 - RESERVED_CONNS
            )

        await wait_until(workers_full)
        with anyio.fail_after(2):  # below connection_timeout: no waiting at all
            await nq.enqueue(Job("plain"))
            async with nq.connection() as conn:
                await nq.enqueue(Job("plain", {"inside": True}), connection=conn)
                await nq.enqueue(Job("plain", {"beside": True}))
        release.set()
        for job_id in ids:
            await wait_processed(db, job_id)
    assert len(followed) == jobs


async def test_the_pool_grows_to_run_every_worker_at_once(dsn: str, db: Database) -> None:
    concurrency = default_max_conns() + 2
    running = 0
    release = anyio.Event()

    async def hold(job: Job) -> None:
        nonlocal running
        running += 1
        await release.wait()

    async with backend(dsn) as nq:  # no pool_max_conns
        await nq.start(Handler("wide", hold, concurrency=concurrency))
        ids = [await nq.enqueue(Job("wide", {"n": n})) for n in range(concurrency)]
        await wait_until(lambda: running == concurrency)
        pool = nq.statistics().pool
        assert pool is not None
        assert pool.max_size == concurrency + RESERVED_CONNS
        assert pool.worker_in_use == pool.worker_max_size == concurrency
        with anyio.fail_after(2):
            await nq.enqueue(Job("plain"))
        release.set()
        for job_id in ids:
            await wait_processed(db, job_id)


async def test_start_warns_when_pool_max_conns_is_too_small(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def noop(job: Job) -> None:
        pass

    with caplog.at_level(logging.WARNING, logger="neoq_anyio"):
        async with backend(dsn + " pool_max_conns=5") as nq:
            await nq.start(Handler("fits", noop, concurrency=3))
            assert not [r for r in caplog.records if "pool_max_conns" in r.getMessage()]
            await nq.start(Handler("too_many", noop, concurrency=2))
            pool = nq.statistics().pool
            assert pool is not None
            assert (pool.max_size, pool.worker_max_size) == (5, 3)
    [warning] = [r for r in caplog.records if "pool_max_conns" in r.getMessage()]
    message = warning.getMessage()
    assert warning.levelno == logging.WARNING
    assert "pool_max_conns=5 is too small" in message
    assert "concurrency 5 in all" in message
    assert f"the {RESERVED_CONNS} connections kept" in message
    assert "at most 3 jobs run at once" in message
    assert f"Raise pool_max_conns to {5 + RESERVED_CONNS}" in message
