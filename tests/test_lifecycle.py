"""Startup, schema, future jobs, shutdown, restarts, and many backends on one database."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import psycopg
import pytest
from psycopg import sql

from neoq_anyio import (
    ConnectionStringError,
    DatabaseError,
    Handler,
    Job,
    current_transaction,
    open_backend,
)

from .conftest import Database, Server, wait_until, with_params
from .test_processing import Recorder, backend

if TYPE_CHECKING:
    from neoq_anyio._models import Execution


async def test_schema_is_created_with_go_neoqs_bookkeeping(dsn: str, db: Database) -> None:
    async with backend(dsn):
        pass
    tables = {
        r[0]
        for r in await db.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
    }
    assert {"neoq_jobs", "neoq_dead_jobs", "neoq_schema_migrations"} <= tables
    assert await db.fetch("SELECT version, dirty FROM neoq_schema_migrations") == [
        (20240302172413, False)
    ]
    assert (
        await db.value(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'neoq_jobs' "
            "AND column_name = 'id'"
        )
        == "bigint"
    )
    assert await db.value("SELECT count(*) FROM pg_trigger WHERE tgname = 'announce_job'") >= 1


async def test_concurrent_startups_migrate_once(dsn: str, db: Database) -> None:
    opened = 0

    async def open_one() -> None:
        nonlocal opened
        async with backend(dsn):
            opened += 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(open_one)
    assert opened == 6
    assert await db.value("SELECT count(*) FROM neoq_anyio_migrations") == 1
    assert await db.value("SELECT count(*) FROM neoq_schema_migrations") == 1


@pytest.mark.parametrize("execution", ["transaction", "lease"])
async def test_opens_on_a_schema_go_neoq_created(
    dsn: str, db: Database, schema_name: str, execution: Execution
) -> None:
    # The schema as Go neoq's migrations leave it (before neoq_anyio's additions).
    await db.execute(
        sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema_name)).as_string(None)
    )
    await db.execute(
        """
        CREATE TYPE job_status AS ENUM ('new', 'processed', 'failed');
        CREATE TABLE neoq_dead_jobs (id SERIAL NOT NULL, fingerprint text NOT NULL,
            queue text NOT NULL, status job_status NOT NULL default 'failed', payload jsonb,
            retries integer, max_retries integer,
            created_at timestamp with time zone DEFAULT now(), error text,
            deadline timestamp with time zone);
        CREATE TABLE neoq_jobs (id SERIAL NOT NULL, fingerprint text NOT NULL,
            queue text NOT NULL, status job_status NOT NULL default 'new', payload jsonb,
            retries integer default 0, max_retries integer default 23,
            run_after timestamp with time zone DEFAULT now(),
            ran_at timestamp with time zone,
            created_at timestamp with time zone DEFAULT now(), error text,
            deadline timestamp with time zone);
        ALTER TABLE neoq_jobs ALTER COLUMN id SET DATA TYPE bigint;
        CREATE UNIQUE INDEX neoq_jobs_fingerprint_unique_idx ON neoq_jobs
            (queue, fingerprint, status) WHERE NOT (status = 'processed');
        CREATE OR REPLACE FUNCTION announce_job() RETURNS trigger AS $$
        BEGIN PERFORM pg_notify(CAST(NEW.queue AS text), CAST(NEW.id AS text)); RETURN NEW;
        END; $$ LANGUAGE plpgsql;
        CREATE TRIGGER announce_job AFTER INSERT ON neoq_jobs FOR EACH ROW
            WHEN (NEW.run_after <= timezone('utc', NEW.created_at))
            EXECUTE PROCEDURE announce_job();
        CREATE TABLE neoq_schema_migrations (version bigint NOT NULL PRIMARY KEY,
            dirty boolean NOT NULL);
        INSERT INTO neoq_schema_migrations VALUES (20240302172413, false);
        INSERT INTO neoq_jobs (queue, fingerprint, payload) VALUES ('go', 'fp-from-go', '{"n": 1}');
        """
    )
    rec = Recorder()
    async with backend(dsn) as nq:
        await nq.start(Handler("go", rec, execution=execution))
        await rec.wait()
    assert rec.jobs[0].payload == {"n": 1}
    await db.wait_for("SELECT status FROM neoq_jobs WHERE queue = 'go'", lambda s: s == "processed")
    assert await db.fetch("SELECT version, dirty FROM neoq_schema_migrations") == [
        (20240302172413, False)
    ]
    assert (
        await db.value(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'neoq_dead_jobs' "
            "AND column_name = 'id'"
        )
        == "bigint"
    )


async def test_missing_database_is_created(server_dsn: str) -> None:
    name = f"neoq_created_{datetime.now(UTC).strftime('%H%M%S%f')}"
    target = with_params(server_dsn, dbname=name)
    try:
        rec = Recorder()
        async with backend(target) as nq:
            await nq.start(Handler("fresh", rec))
            await nq.enqueue(Job("fresh"))
            await rec.wait()
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.parametrize(
    ("conninfo", "culprit"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("mysql://u:hunter2@db/app", "mysql", id="scheme"),
        pytest.param("postgres://u:hunter2@db/app?pool_max_conns=0", "pool_max_conns", id="pool"),
        pytest.param(
            "host=db password=hunter2 pool_max_conn_lifetime=1d", "pool_max_conn_lifetime", id="dur"
        ),
        pytest.param("host=db password=hunter2 nonsense=1", "nonsense", id="unknown-option"),
        pytest.param("host=db password='hunter2", "", id="unterminated-quote"),
    ],
)
async def test_malformed_connection_string(conninfo: str, culprit: str) -> None:
    with pytest.raises(ConnectionStringError) as info:
        async with open_backend(conninfo):
            pytest.fail("the body must not run")
    assert culprit in str(info.value)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(info.value.__cause__) + repr(info.value.__context__)


async def test_unreachable_database_fails_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conninfo = f"postgresql://app:hunter2@127.0.0.1:{port}/app?connect_timeout=2"
    with caplog.at_level(logging.DEBUG), pytest.raises(DatabaseError) as info:
        with anyio.fail_after(20):
            async with open_backend(conninfo):
                pytest.fail("the body must not run")
    assert str(port) in str(info.value)
    assert "hunter2" not in str(info.value)
    assert all("hunter2" not in r.getMessage() for r in caplog.records)


async def test_lone_exception_from_the_block_comes_out_unwrapped(dsn: str) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with backend(dsn):
            raise KeyError("mine")


async def test_future_job_runs_at_its_time(dsn: str, db: Database) -> None:
    ran_at: list[datetime] = []
    rec = Recorder()

    async def handle(job: Job) -> None:
        ran_at.append(datetime.now(UTC))
        await rec(job)

    async with backend(dsn) as nq:
        await nq.start(Handler("later", handle))
        due = datetime.now(UTC) + timedelta(milliseconds=700)
        await nq.enqueue(Job("later", run_after=due))
        await rec.wait()
    assert ran_at[0] >= due - timedelta(milliseconds=20)  # clocks of db and process
    assert ran_at[0] < due + timedelta(seconds=1)


async def test_future_job_survives_a_restart_of_the_process(dsn: str) -> None:
    due = datetime.now(UTC) + timedelta(milliseconds=600)
    async with backend(dsn) as nq:
        await nq.enqueue(Job("persisted", {"n": 1}, run_after=due))
    rec = Recorder()
    async with backend(dsn) as nq:
        await nq.start(Handler("persisted", rec))
        await rec.wait()
    assert rec.jobs[0].payload == {"n": 1}


async def test_future_job_enqueued_by_another_process_beyond_the_window(dsn: str) -> None:
    rec = Recorder()
    async with backend(dsn, future_job_window=0.3) as worker, backend(dsn) as producer:
        await worker.start(Handler("far", rec))
        due = datetime.now(UTC) + timedelta(milliseconds=800)
        await producer.enqueue(Job("far", run_after=due))
        await rec.wait()
    assert datetime.now(UTC) >= due


async def test_shutdown_lets_jobs_in_flight_finish(dsn: str, db: Database) -> None:
    started = anyio.Event()
    finished: list[str] = []

    async def handle(job: Job) -> None:
        started.set()
        await anyio.sleep(0.3)
        finished.append(job.id or "")

    async with backend(dsn, shutdown_timeout=5) as nq:
        await nq.start(Handler("graceful", handle))
        job_id = await nq.enqueue(Job("graceful"))
        with anyio.fail_after(10):
            await started.wait()
    assert finished == [job_id]
    assert await db.value(f"SELECT status FROM neoq_jobs WHERE id = {job_id}") == "processed"


async def test_shutdown_timeout_cancels_jobs_which_stay_queued(dsn: str, db: Database) -> None:
    started = anyio.Event()
    cancelled = anyio.Event()

    async def handle(job: Job) -> None:
        await current_transaction().execute("CREATE TABLE side_effect (n int)")
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    with anyio.fail_after(10):
        async with backend(dsn, shutdown_timeout=0.2) as nq:
            await nq.start(Handler("stuck", handle))
            job_id = await nq.enqueue(Job("stuck"))
            await started.wait()
    assert cancelled.is_set()
    row = await db.fetch(
        f"SELECT status, retries, error, ran_at FROM neoq_jobs WHERE id = {job_id}"
    )
    assert row == [("new", 0, None, None)]
    assert await db.value("SELECT to_regclass('side_effect')") is None
    # No connection was left with a query running or a transaction open.
    busy = await db.value(
        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
        "AND application_name = current_setting('application_name') "
        "AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')"
    )
    assert busy == 0


async def test_cancelled_mid_query_job_stays_queued(dsn: str, db: Database) -> None:
    in_query = anyio.Event()

    async def handle(job: Job) -> None:
        in_query.set()
        await current_transaction().execute("SELECT pg_sleep(30)")

    with anyio.fail_after(15):
        async with anyio.create_task_group() as outer:

            async def run_backend() -> None:
                async with backend(dsn, shutdown_timeout=0.1) as nq:
                    await nq.start(Handler("cancel-me", handle))
                    await nq.enqueue(Job("cancel-me"))
                    await anyio.sleep_forever()

            outer.start_soon(run_backend)
            await in_query.wait()
            await anyio.sleep(0.1)
            outer.cancel_scope.cancel()
    assert await db.fetch("SELECT status, retries FROM neoq_jobs") == [("new", 0)]
    sleeping = await db.value(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%'"
    )
    assert sleeping == 0


async def test_many_backends_run_each_job_once(dsn: str, db: Database) -> None:
    total = 120
    runs: Counter[str] = Counter()
    done = anyio.Event()

    async def handle(job: Job) -> None:
        await current_transaction().execute(
            "INSERT INTO runs (job_id) VALUES (%s)", (int(job.id or 0),)
        )
        runs[job.id or ""] += 1
        if len(runs) >= total:
            done.set()

    async with backend(dsn) as setup, setup.connection() as conn:
        await conn.execute("CREATE TABLE runs (job_id bigint PRIMARY KEY)")
    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:

            async def one_process(index: int) -> None:
                async with backend(dsn + " pool_max_conns=3") as nq:
                    await nq.start(Handler("shared", handle, concurrency=3))
                    for n in range(total // 4):
                        await nq.enqueue(Job("shared", {"from": index, "n": n}))
                    await done.wait()

            for index in range(4):
                tg.start_soon(one_process, index)
    assert len(runs) == total
    assert set(runs.values()) == {1}
    assert await db.value("SELECT count(*) FROM runs") == total
    assert await db.value("SELECT count(*) FROM neoq_jobs WHERE status = 'processed'") == total


async def terminate_our_sessions(db: Database) -> int:
    """Kill every other session on the database, as a server restart would."""
    return int(
        await db.value(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'"
        )
    )


async def test_listener_reconnects_and_finds_missed_jobs(dsn: str, db: Database) -> None:
    rec = Recorder(expected=2)
    async with backend(dsn, pending_job_check_interval=60) as nq:
        await nq.start(Handler("deaf", rec, concurrency=2))
        await nq.enqueue(Job("deaf", {"n": 1}))
        await wait_until(lambda: len(rec.jobs) == 1)
        assert await terminate_our_sessions(db) >= 1
        # Enqueued while the listener is down: the reconnect's sweep finds it
        # (the pending poller would only run in 60 s).
        await db.execute(
            "INSERT INTO neoq_jobs (queue, fingerprint, payload) VALUES ('deaf', 'x', '{\"n\": 2}')"
        )
        await rec.wait()
        assert nq.statistics().listener_reconnects >= 1
    assert [j.payload for j in rec.jobs] == [{"n": 1}, {"n": 2}]


async def run_through_outage(dsn: str, db: Database, outage: Any, *, total: int = 60) -> None:
    """Process a stream of jobs while ``outage()`` cuts every connection."""
    committed: Counter[int] = Counter()
    halfway = anyio.Event()

    async def handle(job: Job) -> None:
        await current_transaction().execute(
            "INSERT INTO done (job_id) VALUES (%s)", (int(job.id or 0),)
        )
        committed[int(job.id or 0)] += 1
        if len(committed) >= total // 2:
            halfway.set()

    async with backend(dsn, pending_job_check_interval=0.5) as nq:
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE done (job_id bigint PRIMARY KEY)")
        await nq.start(Handler("outage", handle, concurrency=4))
        ids = []
        for n in range(total // 2):
            ids.append(await nq.enqueue(Job("outage", {"n": n})))
        with anyio.fail_after(20):
            await halfway.wait()
        await outage()
        with anyio.fail_after(30):
            for n in range(total // 2, total):
                while True:
                    try:
                        ids.append(await nq.enqueue(Job("outage", {"n": n})))
                        break
                    except DatabaseError:
                        await anyio.sleep(0.1)  # the server is still coming back
            await db.wait_for(
                "SELECT count(*) FROM neoq_jobs WHERE status = 'processed'",
                lambda n: n == total,
                timeout=30,
            )
    # Every job ran to completion exactly once: the primary key on done.job_id
    # would have failed a second completed run.
    assert await db.value("SELECT count(*) FROM done") == total


async def test_no_job_lost_when_connections_drop(dsn: str, db: Database) -> None:
    async def outage() -> None:
        assert await terminate_our_sessions(db) >= 1

    await run_through_outage(dsn, db, outage)


async def test_no_job_lost_across_a_server_restart(server: Server, dsn: str) -> None:
    if server.restart is None:
        pytest.skip("restarting needs the embedded server, or NEOQ_TEST_RESTART_COMMAND")
    from neoq_anyio._pg._connection import connect

    restart = server.restart
    conn = await connect(dsn)
    holder = Database(conn)

    async def outage() -> None:
        await anyio.to_thread.run_sync(restart)
        await holder.conn.close()
        holder.conn = await connect(dsn)

    try:
        await run_through_outage(dsn, holder, outage)
    finally:
        await holder.conn.close()


async def test_go_neoqs_older_fingerprint_index_is_replaced(
    dsn: str, db: Database, schema_name: str
) -> None:
    # Go neoq before 20240302172413: one unprocessed job per (fingerprint, status).
    await db.execute(
        sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema_name)).as_string(None)
    )
    await db.execute(
        """
        CREATE TYPE job_status AS ENUM ('new', 'processed', 'failed');
        CREATE TABLE neoq_jobs (id SERIAL NOT NULL, fingerprint text NOT NULL,
            queue text NOT NULL, status job_status NOT NULL default 'new', payload jsonb,
            retries integer default 0, max_retries integer default 23,
            run_after timestamp with time zone DEFAULT now(),
            ran_at timestamp with time zone,
            created_at timestamp with time zone DEFAULT now(), error text);
        CREATE UNIQUE INDEX neoq_jobs_fingerprint_unique_idx ON neoq_jobs
            (fingerprint, status) WHERE NOT (status = 'processed');
        """
    )
    async with backend(dsn) as nq:
        # The same payload on two queues: the older index refused the second.
        await nq.enqueue(Job("a", {"n": 1}, fingerprint="same"))
        await nq.enqueue(Job("b", {"n": 1}, fingerprint="same"))
    assert "(queue, fingerprint, status)" in await db.value(
        "SELECT pg_get_indexdef(to_regclass('neoq_jobs_fingerprint_unique_idx'))"
    )
