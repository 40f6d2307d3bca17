"""Behind a real PgBouncer in transaction pooling (``open_backend(pooler="transaction")``).

A PgBouncer of the module's own (``tests/_pgbouncer.py``) stands in front of
the test server; each test gets a role whose default search_path is a fresh
schema (PgBouncer 1.18 refuses the ``options`` startup parameter). The
behaviour that makes sense through a pooler runs on both loops, woken two
ways (the ``wakeups`` fixture): by polling every ``job_check_interval``
("poll": no LISTEN connection), and by LISTEN on a direct connection
(``listen_connection_string``, "listen"). Two tests show what goes wrong
without ``pooler=``, so that the warning in docs/poolers.md stays true.

The rules of tests/conftest.py hold: every wait is bounded, and events, not
sleeps, say when something happened.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import pytest

from neoq_anyio import (
    ConfigurationError,
    ConnectionStringError,
    DatabaseError,
    Handler,
    Job,
    current_transaction,
    open_backend,
)
from neoq_anyio._pg._connection import connect
from neoq_anyio._pg._pool import RESET_SESSION
from neoq_anyio._postgres._sessions import plan_sessions
from neoq_anyio._postgres._sql import PerTransaction
from neoq_anyio.testing import fast_forward

from ._pgbouncer import PgBouncer, PooledDatabase, pgbouncer_path, pooled_database, start_pgbouncer
from ._processes import running
from .conftest import Database, wait_until
from .test_processing import Recorder

if TYPE_CHECKING:
    from neoq_anyio import Backend, PostgresBackend
    from neoq_anyio._models import Execution
    from neoq_anyio._open import Pooler

FAST: dict[str, Any] = {
    "job_check_interval": 0.05,
    "pending_job_check_interval": 0.5,
    "shutdown_timeout": 2,
}

EXECUTIONS = ["transaction", "lease"]


@pytest.fixture(scope="module")
def bouncer(server_dsn: str) -> Iterator[PgBouncer]:
    if pgbouncer_path() is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer; .ci/run does)")
    with start_pgbouncer(server_dsn) as running_bouncer:
        yield running_bouncer


@pytest.fixture
def pooled(bouncer: PgBouncer) -> Iterator[PooledDatabase]:
    with pooled_database(bouncer) as database:
        yield database


@pytest.fixture(params=["poll", "listen"])
def wakeups(request: pytest.FixtureRequest, pooled: PooledDatabase) -> dict[str, Any]:
    """``open_backend`` options for the pooler, without or with a LISTEN connection."""
    options: dict[str, Any] = {"pooler": "transaction"}
    if request.param == "listen":
        options["listen_connection_string"] = pooled.direct_dsn
    return options


@pytest.fixture
async def direct(pooled: PooledDatabase) -> AsyncIterator[Database]:
    """The test's schema, straight from the server (not through PgBouncer)."""
    conn = await connect(pooled.direct_dsn)
    try:
        yield Database(conn)
    finally:
        await conn.close()


@asynccontextmanager
async def pooled_backend(dsn: str, **options: Any) -> AsyncIterator[Any]:
    async with open_backend(dsn, **{**FAST, **options}) as nq:
        yield nq


# -- processing ---------------------------------------------------------------------------


@pytest.mark.parametrize("execution", EXECUTIONS)
async def test_jobs_run_through_the_pooler(
    pooled: PooledDatabase, wakeups: dict[str, Any], direct: Database, execution: Execution
) -> None:
    handled = Recorder(31)
    async with pooled_backend(pooled.dsn, **wakeups) as nq:
        before = await nq.enqueue(Job("work", {"n": -1}))
        await nq.start(Handler("work", handled, concurrency=4, execution=execution))
        ids = [before]
        # More than psycopg's prepare threshold, from several pooled connections:
        # a prepared statement would meet another client's server session.
        async with anyio.create_task_group() as tg:

            async def enqueue(start: int) -> None:
                for n in range(start, start + 10):
                    ids.append(await nq.enqueue(Job("work", {"n": n})))

            for start in (0, 10, 20):
                tg.start_soon(enqueue, start)
        await handled.wait()
    assert sorted(int(job.id or 0) for job in handled.jobs) == sorted(map(int, ids))
    assert await direct.value("SELECT count(*) FROM neoq_jobs WHERE status = 'processed'") == 31


@pytest.mark.parametrize("execution", EXECUTIONS)
async def test_a_job_enqueued_by_another_process_runs(
    pooled: PooledDatabase, wakeups: dict[str, Any], execution: Execution
) -> None:
    # No local wake-up: the worker learns of it from a notification, or from
    # the poller, which runs every job_check_interval when it is all there is.
    handled = Recorder()
    async with pooled_backend(pooled.dsn, **wakeups, pending_job_check_interval=60) as worker:
        await worker.start(Handler("work", handled, execution=execution))
        async with pooled_backend(pooled.dsn, pooler="transaction") as app:
            await app.enqueue(Job("work", {"from": "app"}))
        await handled.wait(5)
    assert handled.jobs[0].payload == {"from": "app"}


@pytest.mark.parametrize("execution", EXECUTIONS)
async def test_retries_and_future_jobs(
    pooled: PooledDatabase, wakeups: dict[str, Any], direct: Database, execution: Execution
) -> None:
    failed = anyio.Event()
    handled: dict[str, Job] = {}
    later_ran = anyio.Event()
    retried = anyio.Event()

    async def handle(job: Job) -> None:
        name = (job.payload or {})["name"]
        if name == "flaky" and job.retries == 0:
            failed.set()
            raise RuntimeError("first run fails")
        handled[name] = job
        (later_ran if name == "later" else retried).set()

    async with pooled_backend(pooled.dsn, **wakeups) as nq:
        await nq.start(Handler("work", handle, execution=execution))
        due = datetime.now(UTC) + timedelta(seconds=0.3)
        later_id = await nq.enqueue(Job("work", {"name": "later"}, run_after=due))
        flaky_id = await nq.enqueue(Job("work", {"name": "flaky"}))
        with anyio.fail_after(10):
            await later_ran.wait()
            await failed.wait()
        # The backoff is Go neoq's (at least 16 s): make it pass.
        await wait_until(lambda: _status(direct, flaky_id, "failed"))
        await fast_forward(nq, 120)
        with anyio.fail_after(10):
            await retried.wait()
    assert (handled["flaky"].id, handled["flaky"].retries) == (flaky_id, 1)
    ran_at = await direct.value("SELECT ran_at FROM neoq_jobs WHERE id = %s", (int(later_id),))
    assert ran_at >= due


async def test_lease_mode_releases_and_rescues_through_the_pooler(
    pooled: PooledDatabase, wakeups: dict[str, Any], direct: Database
) -> None:
    started = anyio.Event()

    async def forever(job: Job) -> None:
        started.set()
        await anyio.sleep_forever()

    # Cut short by shutdown: the lease is given back.
    async with pooled_backend(pooled.dsn, **{**wakeups, "shutdown_timeout": 0}) as nq:
        await nq.start(Handler("work", forever, execution="lease"))
        job_id = await nq.enqueue(Job("work", {}))
        with anyio.fail_after(10):
            await started.wait()
    query = "SELECT status::text, lease_token, retries FROM neoq_jobs WHERE id = %s"
    assert await direct.fetch(query, (int(job_id),)) == [("new", None, 0)]

    # Its worker lost (a lease that expired): claimed again, the attempt counted.
    await direct.execute(
        "UPDATE neoq_jobs SET lease_token = 1, lease_expires_at = now() - interval '1 second' "
        "WHERE id = %s",
        (int(job_id),),
    )
    handled = Recorder()
    async with pooled_backend(pooled.dsn, **wakeups) as nq:
        await nq.start(Handler("work", handled, execution="lease", lease_duration=1))
        await handled.wait()
    assert (handled.jobs[0].id, handled.jobs[0].retries) == (job_id, 1)


async def _status(db: Database, job_id: str, status: str) -> bool:
    found = await db.value("SELECT status::text FROM neoq_jobs WHERE id = %s", (int(job_id),))
    return bool(found == status)


async def test_cron_ticks_run_once_each(
    pooled: PooledDatabase, wakeups: dict[str, Any], direct: Database
) -> None:
    handled = Recorder(2)
    async with pooled_backend(pooled.dsn, **wakeups) as nq:
        await nq.start_cron("* * * * * *", Handler("", handled))
        await handled.wait(5)
    assert {job.queue for job in handled.jobs} == {"every_second"}
    ticks = await direct.value("SELECT count(DISTINCT fingerprint) FROM neoq_jobs")
    assert ticks == await direct.value("SELECT count(*) FROM neoq_jobs")


# -- the caller's transactions, batches ---------------------------------------------------


async def test_enqueue_inside_a_lent_connection(
    pooled: PooledDatabase, wakeups: dict[str, Any], direct: Database
) -> None:
    handled = Recorder(3)
    async with pooled_backend(pooled.dsn, **wakeups) as nq:
        await nq.start(Handler("work", handled))
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
            await conn.execute("INSERT INTO orders VALUES (1)")
            kept = await nq.enqueue(Job("work", {"order": 1}), connection=conn)
            batch = await nq.enqueue_many(
                [Job("work", {"order": 2}), Job("work", {"order": 3})], connection=conn
            )
        with pytest.raises(RuntimeError, match="rolled back"):
            async with nq.connection() as conn:
                await nq.enqueue(Job("work", {"order": 4}), connection=conn)
                raise RuntimeError("rolled back")
        await handled.wait()
    assert sorted(int(job.id or 0) for job in handled.jobs) == sorted(
        int(job_id or 0) for job_id in [kept, *batch]
    )
    assert await direct.value("SELECT count(*) FROM neoq_jobs") == 3
    assert await direct.value("SELECT count(*) FROM orders") == 1


@pytest.mark.parametrize("execution", EXECUTIONS)
async def test_enqueue_many_through_the_pooler(
    pooled: PooledDatabase, wakeups: dict[str, Any], execution: Execution
) -> None:
    handled = Recorder(40)
    async with pooled_backend(pooled.dsn, **wakeups) as nq:
        await nq.start(Handler("work", handled, concurrency=4, execution=execution))
        for first in range(0, 40, 10):
            ids = await nq.enqueue_many([Job("work", {"n": n}) for n in range(first, first + 10)])
            assert None not in ids
        await handled.wait()
    assert sorted((job.payload or {})["n"] for job in handled.jobs) == list(range(40))


# -- queue control and global limits -----------------------------------------------------


async def test_pause_and_resume_through_the_pooler(
    pooled: PooledDatabase, wakeups: dict[str, Any]
) -> None:
    handled = Recorder()
    async with pooled_backend(pooled.dsn, **wakeups) as worker:
        await worker.start(Handler("work", handled, execution="lease"))
        await worker.pause_queue("work")
        await worker.enqueue(Job("work", {}))
        with anyio.move_on_after(0.5):  # paused: it waits
            await handled.done.wait()
        assert not handled.jobs
        # Resumed from another process: this one learns of it by a
        # notification, or by its next look at the paused queues.
        async with pooled_backend(pooled.dsn, **wakeups) as app:
            await app.resume_queue("work")
        await handled.wait()


async def test_global_concurrency_through_the_pooler(
    pooled: PooledDatabase, wakeups: dict[str, Any]
) -> None:
    running = 0
    most = 0
    done = Recorder(12)

    async def handle(job: Job) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await anyio.sleep(0.05)  # the job's work: long enough to overlap
        running -= 1
        await done(job)

    handler = Handler("work", handle, execution="lease", concurrency=5, global_concurrency=2)
    async with (
        pooled_backend(pooled.dsn, **wakeups) as first,
        pooled_backend(pooled.dsn, **wakeups) as second,
    ):
        await first.start(handler)
        await second.start(handler)
        await first.enqueue_many([Job("work", {"n": n}) for n in range(12)])
        await done.wait(20)
    assert most <= 2


# -- managing jobs, retention -------------------------------------------------------------


async def test_management_api_through_the_pooler(pooled: PooledDatabase) -> None:
    dead_seen = anyio.Event()
    fine = Recorder()

    async def handle(job: Job) -> None:
        if not dead_seen.is_set():  # only the first run fails
            dead_seen.set()
            raise ValueError("boom")
        await fine(job)

    async with pooled_backend(pooled.dsn, pooler="transaction") as nq:
        await nq.start(Handler("work", handle))
        dead_id = await nq.enqueue(Job("work", {"fail": True}, max_retries=0))
        with anyio.fail_after(10):
            await dead_seen.wait()
        await wait_until(lambda: _job_status(nq, dead_id, "dead"))
        later = datetime.now(UTC) + timedelta(hours=1)
        cancel_id = await nq.enqueue(Job("work", {"n": 1}, run_after=later))
        delete_id = await nq.enqueue(Job("work", {"n": 2}, run_after=later))

        listed = await nq.list_jobs(queue="work")
        assert [job.id for job in listed] == [delete_id, cancel_id, dead_id]
        (stats,) = await nq.queue_stats()
        assert (stats.queue, stats.scheduled, stats.dead) == ("work", 2, 1)

        assert await nq.cancel_job(cancel_id)
        assert await nq.delete_job(delete_id)
        retried = await nq.retry_job(dead_id)
        assert (retried.id, retried.status) == (dead_id, "new")
        await fine.wait()  # the retried job runs again, and now succeeds
        assert fine.jobs[0].id == dead_id
        cancelled = await nq.get_job(cancel_id)
        assert cancelled is not None
        assert (cancelled.status, cancelled.error) == ("dead", "cancelled")
        assert await nq.get_job(delete_id) is None


async def _job_status(nq: Any, job_id: str, status: str) -> bool:
    job = await nq.get_job(job_id)
    return job is not None and bool(job.status == status)


async def test_retention_prunes_through_the_pooler(
    pooled: PooledDatabase, direct: Database
) -> None:
    handled = Recorder(5)
    async with pooled_backend(pooled.dsn, pooler="transaction", keep_processed=0.2) as nq:
        await nq.start(Handler("work", handled))
        await nq.enqueue_many([Job("work", {"n": n}) for n in range(5)])
        await handled.wait()
        await direct.wait_for("SELECT count(*) FROM neoq_jobs", lambda count: count == 0)


# -- what pooler= does to sessions --------------------------------------------------------


@pytest.mark.parametrize("execution", EXECUTIONS)
async def test_settings_travel_with_each_transaction(
    pooled: PooledDatabase, execution: Execution
) -> None:
    # Through the alias that has one server session, every transaction of the
    # test shares it: a setting left in the session would show afterwards.
    seen: dict[str, str] = {}
    done = anyio.Event()
    settings = (
        "SELECT current_setting('synchronous_commit'), "
        "current_setting('idle_in_transaction_session_timeout'), current_setting('TimeZone')"
    )

    async def handle(job: Job) -> None:
        conn = current_transaction()
        for name in ("synchronous_commit", "idle_in_transaction_session_timeout"):
            row: Any = await (await conn.execute(f"SHOW {name}")).fetchone()
            seen[name] = row[0]
        done.set()

    async def session_settings() -> Any:
        conn = await connect(pooled.single_dsn)
        try:
            return await (await conn.execute(settings)).fetchone()
        finally:
            await conn.close()

    before = await session_settings()

    async with pooled_backend(
        pooled.single_dsn, pooler="transaction", transaction_timeout=20
    ) as nq:
        await nq.start(Handler("work", handle, execution=execution, job_timeout=10))
        await nq.enqueue(Job("work", {}))
        with anyio.fail_after(10):
            await done.wait()
    # 20 s plus the 10 % margin (idle_timeout_ms).
    assert seen == {"synchronous_commit": "off", "idle_in_transaction_session_timeout": "22s"}
    assert before[:2] != ("off", "22s")
    assert await session_settings() == before


@pytest.mark.parametrize(
    ("pooler", "prepared"), [(None, True), ("transaction", False), ("transaction_prepared", True)]
)
async def test_prepared_statements_only_where_the_pooler_keeps_them(
    dsn: str, pooler: Pooler | None, prepared: bool
) -> None:
    # Straight to the server, to look at the session: pg_prepared_statements
    # lists the statements psycopg prepared (after 5 uses) on it.
    query = "SELECT count(*) FROM pg_prepared_statements"

    async def count(conn: Any) -> int:
        row = await (await conn.execute(query)).fetchone()
        return int(row[0])

    # No retention: its pruning would take the pool's connection now and then.
    async with open_backend(dsn, pooler=pooler, keep_processed=None, keep_dead=None) as nq:
        for n in range(8):  # one pooled connection, reused (nothing else runs)
            await nq.enqueue(Job("idle", {"n": n}))
        async with nq.connection() as conn:  # that connection, lent
            assert (await count(conn) > 0) is prepared
        async with nq.connection() as conn:  # reset on the way back: none left
            assert await count(conn) == 0


# -- without pooler= ----------------------------------------------------------------------


@pytest.mark.parametrize("pooler", [None, "transaction"])
async def test_without_pooler_a_job_waits_for_the_pending_poller(
    pooled: PooledDatabase, pooler: Pooler | None
) -> None:
    # LISTEN through a transaction pooler lands in whichever server session
    # ran it, which PgBouncer hands to others: the listener hears nothing, and
    # jobs wait for the pending-job poller (every 60 s by default). With
    # pooler=, the poller runs every job_check_interval (1 s by default).
    handled = Recorder()
    async with open_backend(pooled.dsn, shutdown_timeout=2, pooler=pooler) as worker:
        await worker.start(Handler("work", handled))
        # The poller's looks since start are over, and found nothing.
        pending = cast("PostgresBackend", worker)._pending
        looks = pending.checks
        pending.poke()
        await wait_until(lambda: pending.checks > looks and pending.settled)
        async with open_backend(pooled.dsn, pooler=pooler) as app:
            await app.enqueue(Job("work", {}))
        with anyio.move_on_after(3):
            await handled.done.wait()
    assert handled.done.is_set() is (pooler is not None)


async def _enqueue_ten(nq: Backend, errors: list[str]) -> None:
    for n in range(10):
        try:
            await nq.enqueue(Job("work", {"n": n}, fingerprint=os.urandom(8).hex()))
        except DatabaseError as exc:
            errors.append(str(exc))


@pytest.mark.parametrize("pooler", [None, "transaction"])
async def test_without_pooler_prepared_statements_collide(
    pooled: PooledDatabase, pooler: Pooler | None
) -> None:
    # psycopg prepares a statement on its 6th use, in the server session that
    # runs it. Behind one server session, the second pooled connection to
    # prepare the INSERT finds the first one's "_pg3_0" there.
    errors: list[str] = []
    async with open_backend(pooled.single_dsn, shutdown_timeout=2, pooler=pooler) as nq:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(8):  # more tasks than pooled connections
                    tg.start_soon(_enqueue_ten, nq, errors)
    if pooler is None:
        assert any('prepared statement "_pg3_' in error for error in errors), errors
    else:
        assert errors == []


def test_sessions_by_pooler() -> None:
    direct = plan_sessions(pooler=None, synchronous_commit=False, transaction_timeout=30)
    assert (direct.pooled, direct.reset, direct.prepared_statements) == (False, RESET_SESSION, True)
    assert b"synchronous_commit = off" in direct.setup
    assert direct.per_transaction == PerTransaction()

    pooled = plan_sessions(pooler="transaction", synchronous_commit=False, transaction_timeout=30)
    assert (pooled.pooled, pooled.setup, pooled.reset) == (True, b"", b"")
    assert pooled.prepared_statements is False
    assert "'synchronous_commit', 'off'" in pooled.per_transaction.writes
    assert "'idle_in_transaction_session_timeout', '33000'" in pooled.per_transaction.opens

    kept = plan_sessions(pooler="transaction", synchronous_commit=True, transaction_timeout=0)
    assert kept.per_transaction.writes == ""
    assert "'idle_in_transaction_session_timeout', '0'" in kept.per_transaction.opens

    prepared = plan_sessions(
        pooler="transaction_prepared", synchronous_commit=False, transaction_timeout=30
    )
    assert (prepared.pooled, prepared.reset, prepared.prepared_statements) == (
        True,
        b"DEALLOCATE ALL",
        True,
    )


# -- options --------------------------------------------------------------------------------


@pytest.mark.parametrize("pooler", ["statement", "TRANSACTION", "", 1])
async def test_an_unknown_pooler_is_refused_on_both_backends(
    connection_string: str, pooler: Any
) -> None:
    with pytest.raises(ConfigurationError, match="pooler must be one of None, 'session'"):
        async with open_backend(connection_string, pooler=pooler):
            pass


async def test_session_pooling_is_the_default(connection_string: str) -> None:
    handled = Recorder()
    async with open_backend(connection_string, pooler="session", **FAST) as nq:
        await nq.start(Handler("work", handled))
        await nq.enqueue(Job("work", {}))
        await handled.wait()


@pytest.mark.parametrize("listen", ["postgres://db:port/app", "mysql://db/app", 42])
async def test_a_bad_listen_connection_string_is_refused(dsn: str, listen: Any) -> None:
    with pytest.raises(ConnectionStringError):
        async with open_backend(dsn, pooler="transaction", listen_connection_string=listen):
            pass


async def test_the_memory_backend_ignores_the_pooler_options() -> None:
    handled = Recorder()
    async with open_backend(
        "memory://", pooler="transaction", listen_connection_string="host=nowhere"
    ) as nq:
        await nq.start(Handler("work", handled))
        await nq.enqueue(Job("work", {}))
        await handled.wait()


# -- the command line -----------------------------------------------------------------------

APP = """
import os
import pathlib

from neoq_anyio import Handler, Job


async def run(job: Job) -> None:
    (pathlib.Path(os.environ["MARKS"]) / f"ran-{job.id}").touch()


async def setup(nq) -> None:
    await nq.start(Handler("cli", run))
"""


async def test_the_command_line_through_the_pooler(
    pooled: PooledDatabase,
    wakeups: dict[str, Any],
    tmp_path: Path,
    anyio_backend_name: str,
) -> None:
    (tmp_path / "pooled_app.py").write_text(APP)
    env = {
        **os.environ,
        "NEOQ_DSN": pooled.dsn,
        "NEOQ_POOLER": "transaction",
        "MARKS": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
    }
    if "listen_connection_string" in wakeups:
        env["NEOQ_LISTEN_DSN"] = wakeups["listen_connection_string"]

    async def cli(*args: str) -> str:
        result = await anyio.run_process([sys.executable, "-m", "neoq_anyio", *args], env=env)
        return result.stdout.decode()

    assert "up to date" in await cli("migrate")
    worker = [sys.executable, "-m", "neoq_anyio", "worker", "pooled_app:setup"]
    async with running([*worker, "--loop", anyio_backend_name], env=env, cwd=tmp_path) as child:
        await child.wait_for_log("worker started")
        job_id = (await cli("enqueue", "cli", '{"n": 1}')).strip()
        await wait_until((tmp_path / f"ran-{job_id}").exists, timeout=10)
        child.signal(signal.SIGTERM)
        assert await child.exit_status() == 0
    assert '"processed": 1' in await cli("stats", "--json")
    assert '"processed": 1' in await cli("prune", "--older-than", "0s", "--json")
