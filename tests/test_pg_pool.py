"""The AnyIO connection pool (neoq_anyio._pg._pool) against a real PostgreSQL.

Every test runs on asyncio and on trio (conftest). Pool options come from the
connection string, in pgxpool's names and Go duration syntax, as users write them.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import psycopg
import pytest
from psycopg import pq, sql
from psycopg.rows import dict_row, tuple_row

from neoq_anyio import AnyioConnection, DatabaseError, PoolTimeoutError
from neoq_anyio._pg._connection import connect
from neoq_anyio._pg._dsn import parse_connection_string
from neoq_anyio._pg._pool import (
    RESERVED_CONNS,
    ConnectionPool,
    PoolStatistics,
    worker_share,
)
from neoq_anyio._pg._pool_options import default_max_conns

from .conftest import Database, wait_until

IDLE = pq.TransactionStatus.IDLE
INTRANS = pq.TransactionStatus.INTRANS
INERROR = pq.TransactionStatus.INERROR


class Harness:
    """A pool over the test's database, whose backends carry an application_name of
    their own so that pg_stat_activity tells which are open."""

    def __init__(self, dsn: str, schema_name: str, db: Database) -> None:
        self.app = f"pool_{schema_name}"
        self.dsn = f"{dsn} application_name={self.app}"
        self.db = db

    def pool(self, options: str = "", *, timeout: float = 5.0) -> ConnectionPool:
        settings = parse_connection_string(f"{self.dsn} {options}")
        conninfo = settings.conninfo
        return ConnectionPool(lambda: connect(conninfo), settings.pool, connection_timeout=timeout)

    async def wait_backend_count(self, count: int) -> set[int]:
        """Wait (bounded) until ``count`` backends are open; return their pids."""

        async def settled() -> bool:
            return len(await self.backends()) == count

        await wait_until(settled)
        return await self.backends()

    async def backends(self) -> set[int]:
        """Backend pids currently open for this test's pools."""
        rows = await self.db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self.app,)
        )
        return {row[0] for row in rows}

    async def wait_backends(self, expected: set[int]) -> None:
        """Wait (bounded) until exactly ``expected`` backends are open."""

        async def matches() -> bool:
            return await self.backends() == expected

        await wait_until(matches)


@pytest.fixture
def harness(dsn: str, schema_name: str, db: Database) -> Harness:
    return Harness(dsn, schema_name, db)


@asynccontextmanager
async def opened(pool: ConnectionPool) -> AsyncIterator[ConnectionPool]:
    try:
        yield pool
    finally:
        pool.close()


@asynccontextmanager
async def maintained(pool: ConnectionPool) -> AsyncIterator[ConnectionPool]:
    """The pool with its maintenance loop running, as the backend runs it."""
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(pool.run)
            yield pool
            tg.cancel_scope.cancel()
    finally:
        pool.close()


def stats(
    size: int, idle: int, in_use: int, waiting: int = 0, *, max_size: int, worker_in_use: int = 0
) -> PoolStatistics:
    return PoolStatistics(
        size=size,
        idle=idle,
        in_use=in_use,
        waiting=waiting,
        max_size=max_size,
        worker_in_use=worker_in_use,
        worker_max_size=worker_share(max_size),
    )


def waiting_is(pool: ConnectionPool, count: int) -> Callable[[], bool]:
    return lambda: pool.statistics().waiting == count


def pid_of(conn: AnyioConnection) -> int:
    return conn.pgconn.backend_pid


async def wait_running(db: Database, pid: int) -> None:
    """Poll pg_stat_activity (bounded) until backend ``pid`` is running pg_sleep."""

    async def running() -> bool:
        return bool(
            await db.value(
                "SELECT count(*) = 1 FROM pg_stat_activity"
                " WHERE pid = %s AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'",
                (pid,),
            )
        )

    await wait_until(running)


async def create_table(db: Database, schema_name: str) -> None:
    await db.conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema_name)))
    await db.execute("CREATE TABLE items (n int)")


# -- lending ----------------------------------------------------------------------------


async def test_acquire_and_release_reuse_connections_last_in_first_out(
    harness: Harness,
) -> None:
    async with opened(harness.pool("pool_max_conns=4")) as pool:
        assert pool.statistics() == stats(0, 0, 0, max_size=4)
        first = await pool.acquire()
        assert pool.statistics() == stats(1, 0, 1, max_size=4)
        second = await pool.acquire()
        assert second is not first
        assert pool.statistics() == stats(2, 0, 2, max_size=4)
        assert first.autocommit is True
        assert first.pgconn.transaction_status == IDLE

        await pool.release(first)
        assert pool.statistics() == stats(2, 1, 1, max_size=4)
        await pool.release(second)
        assert pool.statistics() == stats(2, 2, 0, max_size=4)

        # The most recently released comes out first.
        again = await pool.acquire()
        assert again is second
        assert pool.statistics() == stats(2, 1, 1, max_size=4)
        async with pool.connection() as lent:
            assert lent is first
            assert pool.statistics() == stats(2, 0, 2, max_size=4)
            cur = await lent.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        assert pool.statistics() == stats(2, 1, 1, max_size=4)
        await pool.release(again)
        assert pool.statistics() == stats(2, 2, 0, max_size=4)
        assert await harness.backends() == {pid_of(first), pid_of(second)}


async def test_many_tasks_share_at_most_max_conns(harness: Harness) -> None:
    peak = 0
    pids: set[int] = set()
    done = 0

    async with opened(harness.pool("pool_max_conns=3", timeout=20)) as pool:

        async def work() -> None:
            nonlocal peak, done
            async with pool.connection() as conn:
                peak = max(peak, pool.statistics().in_use)
                pids.add(pid_of(conn))
                await conn.execute("SELECT pg_sleep(0.01)")
            done += 1

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(work)
        assert done == 20
        assert peak == 3
        assert len(pids) == 3
        assert pool.statistics() == stats(3, 3, 0, max_size=3)


async def test_third_acquire_times_out_with_a_helpful_message(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=2", timeout=30)) as pool:
        held = [await pool.acquire(), await pool.acquire()]
        with anyio.fail_after(5):
            start = anyio.current_time()
            with pytest.raises(PoolTimeoutError) as info:
                await pool.acquire(timeout=0.2)
            elapsed = anyio.current_time() - start
        assert 0.15 <= elapsed < 3
        assert isinstance(info.value, TimeoutError)
        message = str(info.value)
        assert "0.2 s" in message
        assert "pool_max_conns=2" in message
        assert "raise pool_max_conns or connection_timeout" in message
        assert pool.statistics() == stats(2, 0, 2, max_size=2)
        assert await harness.backends() == {pid_of(conn) for conn in held}
        for conn in held:
            await pool.release(conn)
        assert pool.statistics() == stats(2, 2, 0, max_size=2)


async def test_acquire_defaults_to_the_pool_connection_timeout(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=1", timeout=0.2)) as pool:
        async with pool.connection():
            with anyio.fail_after(5), pytest.raises(PoolTimeoutError, match=r"0\.2 s"):
                await pool.acquire()
            with anyio.fail_after(5), pytest.raises(PoolTimeoutError):
                async with pool.connection():
                    pass  # pragma: no cover - never lent
        assert pool.statistics() == stats(1, 1, 0, max_size=1)


async def test_a_released_connection_goes_straight_to_a_waiter(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=1", timeout=30)) as pool:
        held = await pool.acquire()
        got: list[AnyioConnection] = []
        served = anyio.Event()

        async def waiter() -> None:
            got.append(await pool.acquire())
            served.set()

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await wait_until(lambda: pool.statistics().waiting == 1)
                assert pool.statistics() == stats(1, 0, 1, 1, max_size=1)
                await pool.release(held)
                # Handed over, never parked idle for someone else to take.
                assert pool.statistics() == stats(1, 0, 1, max_size=1)
                await served.wait()
        assert got == [held]
        await pool.release(held)
        assert pool.statistics() == stats(1, 1, 0, max_size=1)


async def test_waiters_are_served_first_come_first_served(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=1", timeout=30)) as pool:
        held = await pool.acquire()
        order: list[str] = []

        async def waiter(name: str) -> None:
            async with pool.connection() as conn:
                assert conn is held
                order.append(name)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for expected, name in enumerate(["first", "second", "third"], start=1):
                    tg.start_soon(waiter, name)
                    await wait_until(waiting_is(pool, expected))
                await pool.release(held)
        assert order == ["first", "second", "third"]
        assert pool.statistics() == stats(1, 1, 0, max_size=1)


# -- what comes back ----------------------------------------------------------------------


async def test_a_connection_returned_in_a_transaction_is_rolled_back(
    harness: Harness, schema_name: str
) -> None:
    await create_table(harness.db, schema_name)
    async with opened(harness.pool("pool_max_conns=1")) as pool:
        conn = await pool.acquire()
        await conn.set_autocommit(False)
        await conn.execute("INSERT INTO items VALUES (1)")
        assert conn.pgconn.transaction_status == INTRANS
        await pool.release(conn)
        assert conn.pgconn.transaction_status == IDLE
        assert await harness.db.value("SELECT count(*) FROM items") == 0
        assert pool.statistics() == stats(1, 1, 0, max_size=1)

        # The same connection again, clean and in autocommit.
        async with pool.connection() as again:
            assert again is conn
            assert again.autocommit is True
            await again.execute("INSERT INTO items VALUES (2)")
            assert again.pgconn.transaction_status == IDLE
        assert await harness.db.fetch("SELECT n FROM items") == [(2,)]


async def test_a_connection_returned_in_a_failed_transaction_is_rolled_back(
    harness: Harness, schema_name: str
) -> None:
    await create_table(harness.db, schema_name)
    async with opened(harness.pool("pool_max_conns=1")) as pool:
        conn = await pool.acquire()
        pid = pid_of(conn)
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO items VALUES (1)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            await conn.execute("SELECT 1 / 0")
        assert conn.pgconn.transaction_status == INERROR
        await pool.release(conn)
        async with pool.connection() as again:
            assert pid_of(again) == pid
            assert again.pgconn.transaction_status == IDLE
            cur = await again.execute("SELECT count(*) FROM items")
            assert await cur.fetchone() == (0,)


async def test_release_in_a_cancelled_scope_still_rolls_back(
    harness: Harness, schema_name: str
) -> None:
    await create_table(harness.db, schema_name)
    async with opened(harness.pool("pool_max_conns=1")) as pool:
        with anyio.fail_after(10), anyio.CancelScope() as scope:
            async with pool.connection() as conn:
                await conn.execute("BEGIN")
                await conn.execute("INSERT INTO items VALUES (1)")
                scope.cancel()
                await anyio.sleep(30)
        assert scope.cancelled_caught
        assert pool.statistics() == stats(1, 1, 0, max_size=1)
        assert await harness.db.value("SELECT count(*) FROM items") == 0
        async with pool.connection() as again:
            assert again is conn
            assert again.pgconn.transaction_status == IDLE


async def run_cancelled_on_lent(pool: ConnectionPool, db: Database, *setup: str) -> int:
    """Lend a connection, run ``setup`` then pg_sleep(30) on it, cancel once running.

    Returns the lent connection's backend pid.
    """
    pids: list[int] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def run() -> None:
                with scope:
                    async with pool.connection() as conn:
                        pids.append(pid_of(conn))
                        for statement in setup:
                            await conn.execute(statement)
                        await conn.execute("SELECT pg_sleep(30)")

            tg.start_soon(run)
            await wait_until(lambda: len(pids) == 1)
            await wait_running(db, pids[0])
            scope.cancel()
    assert scope.cancelled_caught
    return pids[0]


async def test_a_connection_cancelled_mid_query_comes_back_idle(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=1")) as pool:
        pid = await run_cancelled_on_lent(pool, harness.db)
        assert pool.statistics() == stats(1, 1, 0, max_size=1)
        assert (
            await harness.db.value("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
            == "idle"
        )
        with anyio.fail_after(5):
            async with pool.connection() as conn:
                assert conn.pgconn.transaction_status == IDLE
                assert pid_of(conn) == pid
                cur = await conn.execute("SELECT 'usable'")
                assert await cur.fetchone() == ("usable",)


async def test_a_connection_cancelled_mid_transaction_comes_back_rolled_back(
    harness: Harness, schema_name: str
) -> None:
    await create_table(harness.db, schema_name)
    async with opened(harness.pool("pool_max_conns=1")) as pool:
        pid = await run_cancelled_on_lent(pool, harness.db, "BEGIN", "INSERT INTO items VALUES (1)")
        assert pool.statistics() == stats(1, 1, 0, max_size=1)
        assert await harness.db.value("SELECT count(*) FROM items") == 0
        async with pool.connection() as conn:
            assert conn.pgconn.transaction_status == IDLE
            assert pid_of(conn) == pid
            await conn.execute("INSERT INTO items VALUES (2)")
        assert await harness.db.fetch("SELECT n FROM items") == [(2,)]


async def test_a_connection_cancelled_in_a_transaction_block_comes_back_clean(
    harness: Harness, schema_name: str
) -> None:
    await create_table(harness.db, schema_name)
    async with opened(harness.pool("pool_max_conns=1")) as pool:
        pids: list[int] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def run() -> None:
                    with scope:
                        async with pool.connection() as conn, conn.transaction():
                            pids.append(pid_of(conn))
                            await conn.execute("INSERT INTO items VALUES (1)")
                            await conn.execute("SELECT pg_sleep(30)")

                tg.start_soon(run)
                await wait_until(lambda: len(pids) == 1)
                await wait_running(harness.db, pids[0])
                scope.cancel()
        # The block rolled back on its way out: the connection came back clean.
        assert pool.statistics() == stats(1, 1, 0, max_size=1)
        assert await harness.db.value("SELECT count(*) FROM items") == 0
        async with pool.connection() as conn:
            assert pid_of(conn) == pids[0]
            assert conn.pgconn.transaction_status == IDLE
            assert conn._num_transactions == 0
            async with conn.transaction():
                await conn.execute("INSERT INTO items VALUES (2)")
        assert await harness.db.fetch("SELECT n FROM items") == [(2,)]
        assert pool.statistics() == stats(1, 1, 0, max_size=1)


async def test_a_closed_connection_is_discarded(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=2")) as pool:
        conn = await pool.acquire()
        pid = pid_of(conn)
        conn.pgconn.finish()
        await pool.release(conn)
        assert pool.statistics() == stats(0, 0, 0, max_size=2)
        await harness.wait_backends(set())
        async with pool.connection() as fresh:
            assert fresh is not conn
            assert pid_of(fresh) != pid
            assert pool.statistics() == stats(1, 0, 1, max_size=2)
        assert pool.statistics() == stats(1, 1, 0, max_size=2)


async def test_a_connection_terminated_while_lent_is_discarded(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=2")) as pool:
        conn = await pool.acquire()
        pid = pid_of(conn)
        assert await harness.db.value("SELECT pg_terminate_backend(%s)", (pid,)) is True
        await harness.wait_backends(set())
        # Release does not poll the socket (the hot path polls once, on
        # acquire); the dead connection is found and closed there.
        await pool.release(conn)
        async with pool.connection() as fresh:
            assert fresh is not conn
            assert conn.closed
            assert pid_of(fresh) != pid
            cur = await fresh.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        assert pool.statistics() == stats(1, 1, 0, max_size=2)


async def test_an_idle_connection_terminated_is_not_lent_again(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=2")) as pool:
        async with pool.connection() as conn:
            pid = pid_of(conn)
        assert pool.statistics() == stats(1, 1, 0, max_size=2)
        assert await harness.db.value("SELECT pg_terminate_backend(%s)", (pid,)) is True
        await harness.wait_backends(set())
        async with pool.connection() as fresh:
            assert fresh is not conn
            assert pid_of(fresh) != pid
            assert pool.statistics() == stats(1, 0, 1, max_size=2)
            cur = await fresh.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        assert await harness.backends() == {pid_of(fresh)}


async def test_a_failed_connect_frees_its_slot(server_dsn: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conninfo = psycopg.conninfo.make_conninfo(
        server_dsn, host="127.0.0.1", hostaddr="127.0.0.1", port=str(port)
    )
    settings = parse_connection_string(f"{conninfo} pool_max_conns=1")
    pool = ConnectionPool(lambda: connect(settings.conninfo), settings.pool, connection_timeout=5)
    async with opened(pool):
        for _ in range(2):  # the slot is free again after a failure
            with anyio.fail_after(10), pytest.raises(DatabaseError, match="cannot connect"):
                await pool.acquire()
            assert pool.statistics() == stats(0, 0, 0, max_size=1)


# -- waiters that give up --------------------------------------------------------------------


async def test_a_timed_out_or_cancelled_waiter_leaks_nothing(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=1", timeout=30)) as pool:
        held = await pool.acquire()
        with anyio.fail_after(5), pytest.raises(PoolTimeoutError):
            await pool.acquire(timeout=0.1)
        assert pool.statistics() == stats(1, 0, 1, max_size=1)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def waiter() -> None:
                    with scope:
                        await pool.acquire()

                tg.start_soon(waiter)
                await wait_until(lambda: pool.statistics().waiting == 1)
                scope.cancel()
        assert pool.statistics() == stats(1, 0, 1, max_size=1)

        await pool.release(held)
        assert pool.statistics() == stats(1, 1, 0, max_size=1)
        with anyio.fail_after(5):
            assert await pool.acquire(timeout=0.5) is held
        await pool.release(held)
        assert await harness.backends() == {pid_of(held)}


@pytest.mark.parametrize(
    "cancel_first", [False, True], ids=["handover-then-cancel", "cancel-then-handover"]
)
async def test_a_waiter_cancelled_around_a_handover_does_not_lose_the_connection(
    harness: Harness, cancel_first: bool
) -> None:
    async with opened(harness.pool("pool_max_conns=1", timeout=30)) as pool:
        held = await pool.acquire()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def waiter() -> None:
                    with scope:
                        async with pool.connection():
                            await anyio.sleep(30)  # cancelled here, if it got one

                tg.start_soon(waiter)
                await wait_until(lambda: pool.statistics().waiting == 1)
                # Both in the same step: the waiter cannot run in between.
                if cancel_first:
                    scope.cancel()
                    await pool.release(held)
                else:
                    await pool.release(held)
                    scope.cancel()
        assert pool.statistics() == stats(1, 1, 0, max_size=1)
        with anyio.fail_after(5):
            assert await pool.acquire(timeout=0.5) is held
        await pool.release(held)


async def test_a_waiter_cancelled_after_being_granted_a_slot_frees_it(
    harness: Harness,
) -> None:
    async with opened(harness.pool("pool_max_conns=1", timeout=30)) as pool:
        held = await pool.acquire()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def waiter() -> None:
                    with scope:
                        async with pool.connection():
                            await anyio.sleep(30)  # pragma: no cover - cancelled first

                tg.start_soon(waiter)
                await wait_until(lambda: pool.statistics().waiting == 1)
                held.pgconn.finish()
                await pool.release(held)  # discarded: the waiter may open one
                scope.cancel()
        assert pool.statistics() == stats(0, 0, 0, max_size=1)
        async with pool.connection() as fresh:
            assert fresh is not held
            assert pool.statistics() == stats(1, 0, 1, max_size=1)
        await harness.wait_backends({pid_of(fresh)})


# -- maintenance -------------------------------------------------------------------------------


async def test_maintenance_opens_min_conns(harness: Harness) -> None:
    options = "pool_max_conns=4 pool_min_conns=2 pool_health_check_period=50ms"
    async with maintained(harness.pool(options)) as pool:
        await wait_until(lambda: pool.statistics() == stats(2, 2, 0, max_size=4))
        pids = await harness.backends()
        assert len(pids) == 2

        # A dead idle connection is found and replaced.
        victim = min(pids)
        assert await harness.db.value("SELECT pg_terminate_backend(%s)", (victim,)) is True

        async def replaced() -> bool:
            now = await harness.backends()
            return len(now) == 2 and victim not in now

        await wait_until(replaced)
        await wait_until(lambda: pool.statistics() == stats(2, 2, 0, max_size=4))


async def test_a_connection_past_its_lifetime_is_closed_on_release(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=2 pool_max_conn_lifetime=100ms")) as pool:
        conn = await pool.acquire()
        pid = pid_of(conn)
        await conn.execute("SELECT pg_sleep(0.15)")  # outlive the lifetime while lent
        await pool.release(conn)
        assert pool.statistics() == stats(0, 0, 0, max_size=2)
        await harness.wait_backends(set())
        async with pool.connection() as fresh:
            assert pid_of(fresh) != pid


async def test_an_idle_connection_past_its_lifetime_is_not_lent(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=2 pool_max_conn_lifetime=100ms")) as pool:
        async with pool.connection() as conn:
            pid = pid_of(conn)
        await harness.db.execute("SELECT pg_sleep(0.15)")  # outlive the lifetime while idle
        async with pool.connection() as fresh:
            assert pid_of(fresh) != pid
            assert pool.statistics() == stats(1, 0, 1, max_size=2)
        await harness.wait_backends({pid_of(fresh)})


async def test_maintenance_closes_idle_connections_beyond_min(harness: Harness) -> None:
    options = (
        "pool_max_conns=4 pool_min_conns=1 "
        "pool_max_conn_idle_time=50ms pool_health_check_period=20ms"
    )
    async with opened(harness.pool(options)) as pool:
        conns = [await pool.acquire() for _ in range(3)]
        pids = {pid_of(conn) for conn in conns}
        for conn in conns:
            await pool.release(conn)
        assert pool.statistics() == stats(3, 3, 0, max_size=4)
        assert await harness.backends() == pids
        async with maintained(pool):
            await wait_until(lambda: pool.statistics() == stats(1, 1, 0, max_size=4))
            assert await harness.wait_backend_count(1) < pids


async def test_maintenance_keeps_lent_connections_and_min_idle(harness: Harness) -> None:
    options = (
        "pool_max_conns=4 pool_min_conns=2 "
        "pool_max_conn_idle_time=50ms pool_health_check_period=20ms"
    )
    async with maintained(harness.pool(options)) as pool:
        lent = [await pool.acquire() for _ in range(3)]
        await pool.release(lent.pop())
        # Two lent already satisfy min_conns: the idle one goes.
        await wait_until(lambda: pool.statistics() == stats(2, 0, 2, max_size=4))
        for conn in lent:
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
            await pool.release(conn)
        assert pool.statistics() == stats(2, 2, 0, max_size=4)


@pytest.mark.parametrize("min_conns", [0, 1])
async def test_one_maintenance_pass_closes_every_idle_connection_beyond_min(
    harness: Harness, min_conns: int
) -> None:
    # A health-check period of an hour: only the pass run() makes at start counts.
    options = (
        f"pool_max_conns=4 pool_min_conns={min_conns} "
        "pool_max_conn_idle_time=50ms pool_health_check_period=1h"
    )
    async with opened(harness.pool(options)) as pool:
        conns = [await pool.acquire() for _ in range(4)]
        pids = {pid_of(conn) for conn in conns}
        for conn in conns:
            await pool.release(conn)
        await harness.db.execute("SELECT pg_sleep(0.1)")  # all four idle past 50 ms
        async with maintained(pool):
            await wait_until(lambda: pool.statistics().size == min_conns, timeout=1.5)
            assert pool.statistics() == stats(min_conns, min_conns, 0, max_size=4)
            assert await harness.wait_backend_count(min_conns) <= pids


# -- closing --------------------------------------------------------------------------------


async def test_close_closes_idle_connections_and_refuses_acquire(harness: Harness) -> None:
    pool = harness.pool("pool_max_conns=3", timeout=30)
    try:
        conns = [await pool.acquire() for _ in range(3)]
        lent = conns.pop()
        for conn in conns:
            await pool.release(conn)
        assert pool.statistics() == stats(3, 2, 1, max_size=3)

        pool.close()
        assert pool.statistics() == stats(1, 0, 1, max_size=3)
        assert all(conn.closed for conn in conns)
        await harness.wait_backends({pid_of(lent)})
        with pytest.raises(DatabaseError, match="closed"):
            await pool.acquire()
        with pytest.raises(DatabaseError, match="closed"):
            async with pool.connection():
                pass  # pragma: no cover - never lent

        # A connection lent before close() is closed when it comes back.
        cur = await lent.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        await pool.release(lent)
        assert lent.closed
        assert pool.statistics() == stats(0, 0, 0, max_size=3)
        await harness.wait_backends(set())
    finally:
        pool.close()


async def test_close_wakes_waiters_with_an_error(harness: Harness) -> None:
    pool = harness.pool("pool_max_conns=1", timeout=math.inf)
    try:
        held = await pool.acquire()
        errors: list[BaseException] = []

        async def waiter() -> None:
            try:
                await pool.acquire()
            except DatabaseError as exc:
                errors.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await wait_until(lambda: pool.statistics().waiting == 1)
                pool.close()
        assert [str(exc) for exc in errors] == ["the connection pool is closed"]
        await pool.release(held)
        assert pool.statistics() == stats(0, 0, 0, max_size=1)
        await harness.wait_backends(set())
    finally:
        pool.close()


# -- workers and the reserve -----------------------------------------------------------------


async def test_workers_leave_the_reserve_to_other_callers(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=4", timeout=30)) as pool:
        assert worker_share(4) == 4 - RESERVED_CONNS == 2
        workers = [await pool.acquire(math.inf, worker=True) for _ in range(2)]
        assert pool.statistics() == stats(2, 0, 2, max_size=4, worker_in_use=2)
        got: list[AnyioConnection] = []

        async def third_worker() -> None:
            got.append(await pool.acquire(math.inf, worker=True))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(third_worker)
                await wait_until(waiting_is(pool, 1))
                # The reserve is there for everyone else, at once.
                others = [await pool.acquire(timeout=0.5) for _ in range(2)]
                assert pool.statistics() == stats(4, 0, 4, 1, max_size=4, worker_in_use=2)
                for conn in others:
                    await pool.release(conn)
                assert pool.statistics() == stats(4, 2, 2, 1, max_size=4, worker_in_use=2)
                # A worker's connection goes to the worker waiting.
                await pool.release(workers[0])
        assert got == [workers[0]]
        assert pool.statistics() == stats(4, 2, 2, max_size=4, worker_in_use=2)
        for conn in [*got, workers[1]]:
            await pool.release(conn)
        assert pool.statistics() == stats(4, 4, 0, max_size=4)


async def test_other_callers_are_served_before_waiting_workers(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=4", timeout=30)) as pool:
        workers_conn = await pool.acquire(math.inf, worker=True)
        others = [await pool.acquire() for _ in range(3)]
        order: list[str] = []

        async def take(name: str, worker: bool) -> None:
            conn = await pool.acquire(math.inf, worker=worker)
            order.append(name)
            await pool.release(conn)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(take, "worker", True)  # under its share: it waits for a connection
                await wait_until(waiting_is(pool, 1))
                tg.start_soon(take, "enqueue", False)
                await wait_until(waiting_is(pool, 2))
                await pool.release(others.pop())
                await wait_until(lambda: len(order) == 2)
        assert order == ["enqueue", "worker"]
        for conn in [workers_conn, *others]:
            await pool.release(conn)
        assert pool.statistics() == stats(4, 4, 0, max_size=4)


async def test_a_pool_of_default_size_grows_for_workers(harness: Harness) -> None:
    async with opened(harness.pool()) as pool:
        base = default_max_conns()
        assert pool.statistics().max_size == base
        pool.add_workers(base + 3)
        assert pool.statistics().max_size == base + 3 + RESERVED_CONNS
        assert pool.statistics().worker_max_size == base + 3
    async with opened(harness.pool("pool_max_conns=4")) as given:
        given.add_workers(10)
        assert (given.statistics().max_size, given.statistics().worker_max_size) == (4, 2)


async def test_connections_are_opened_two_at_a_time(harness: Harness) -> None:
    settings = parse_connection_string(f"{harness.dsn} pool_max_conns=10")
    opening = peak = 0

    async def counting_connect() -> AnyioConnection:
        nonlocal opening, peak
        opening += 1
        peak = max(peak, opening)
        try:
            return await connect(settings.conninfo)
        finally:
            opening -= 1

    pool = ConnectionPool(counting_connect, settings.pool, connection_timeout=30)
    async with opened(pool):
        held: list[AnyioConnection] = []

        async def take() -> None:
            held.append(await pool.acquire())

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(take)
        assert len(held) == 8
        assert peak == 2
        assert pool.statistics() == stats(8, 0, 8, max_size=10)
        for conn in held:
            await pool.release(conn)


async def test_a_locked_connection_is_not_reused(harness: Harness) -> None:
    async with opened(harness.pool("pool_max_conns=2")) as pool:
        conn = await pool.acquire()
        pid = pid_of(conn)
        await conn.lock.acquire()  # what a notifies() left suspended does
        try:
            await pool.release(conn)
            assert pool.statistics() == stats(0, 0, 0, max_size=2)
            async with pool.connection() as fresh:
                assert pid_of(fresh) != pid
        finally:
            conn.lock.release()


async def test_a_lent_connection_comes_back_reset(harness: Harness, schema_name: str) -> None:
    await create_table(harness.db, schema_name)
    settings = parse_connection_string(f"{harness.dsn} pool_max_conns=1")
    setup = b"SET TimeZone = 'UTC'"

    async def configured() -> AnyioConnection:
        conn = await connect(settings.conninfo)
        await conn.execute(setup)
        return conn

    pool = ConnectionPool(configured, settings.pool, connection_timeout=5, session_setup=setup)
    async with opened(pool):
        conn = await pool.acquire()
        pid = pid_of(conn)
        pool.lend(conn)
        conn.row_factory = dict_row  # type: ignore[assignment]
        await conn.set_read_only(True)
        for statement in (
            "SET TimeZone = 'Asia/Tokyo'",
            "SET statement_timeout = '9s'",
            "CREATE TEMP TABLE scratch (n int)",
            "LISTEN lent",
            "SELECT pg_advisory_lock(7)",
            "PREPARE lent AS SELECT 1",
            "BEGIN",
            "INSERT INTO items VALUES (1)",
        ):
            await conn.execute(statement)
        await pool.release(conn)
        assert pool.statistics() == stats(1, 1, 0, max_size=1)
        assert await harness.db.value("SELECT count(*) FROM items") == 0

        async with pool.connection() as again:
            assert again is not conn
            assert pid_of(again) == pid
            assert again.row_factory is tuple_row
            assert again.autocommit is True
            assert again.read_only is None
            cur = await again.execute(
                "SELECT current_setting('TimeZone'), current_setting('statement_timeout'),"
                " to_regclass('pg_temp.scratch'),"
                " (SELECT count(*) FROM pg_listening_channels()),"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                "  AND pid = pg_backend_pid()),"
                " (SELECT count(*) FROM pg_prepared_statements)"
            )
            assert await cur.fetchone() == ("UTC", "0", None, 0, 0, 0)
            await again.execute("INSERT INTO items VALUES (2)")  # writable again
        # Not lent this time: it comes back as it is, without a reset.
        async with pool.connection() as third:
            assert third is again


@pytest.mark.parametrize(
    "cancel_first", [False, True], ids=["handover-then-cancel", "cancel-then-handover"]
)
async def test_a_worker_cancelled_while_waiting_leaks_nothing(
    harness: Harness, cancel_first: bool
) -> None:
    async with opened(harness.pool("pool_max_conns=3", timeout=30)) as pool:
        held = await pool.acquire(math.inf, worker=True)  # the workers' only connection
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def waiter() -> None:
                    with scope:
                        conn = await pool.acquire(math.inf, worker=True)
                        try:
                            await anyio.sleep(30)  # cancelled here, if it got one
                        finally:
                            await pool.release(conn)

                tg.start_soon(waiter)
                await wait_until(waiting_is(pool, 1))
                assert pool.statistics() == stats(1, 0, 1, 1, max_size=3, worker_in_use=1)
                # Both in the same step: the waiter cannot run in between.
                if cancel_first:
                    scope.cancel()
                    await pool.release(held)
                else:
                    await pool.release(held)
                    scope.cancel()
        assert pool.statistics() == stats(1, 1, 0, max_size=3)
        with anyio.fail_after(5):
            assert await pool.acquire(timeout=0.5, worker=True) is held
        assert pool.statistics() == stats(1, 0, 1, max_size=3, worker_in_use=1)
        await pool.release(held)
