"""The AnyIO connection layer (neoq_anyio._pg._connection) against a real PostgreSQL.

Every test runs on asyncio and on trio (conftest). Each one is about a piece of
psycopg that breaks under trio without the layer: waiting on the socket, the
connection lock, cancellation mid-query, and notifications.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest
from psycopg import pq, sql
from psycopg.generators import notifies

from neoq_anyio import AnyioConnection, DatabaseError
from neoq_anyio._pg import _connection
from neoq_anyio._pg._connection import connect

from .conftest import Database, wait_until, with_params

IDLE = pq.TransactionStatus.IDLE
INTRANS = pq.TransactionStatus.INTRANS
INERROR = pq.TransactionStatus.INERROR

# The state pg_stat_activity shows for a backend.
STATE_OF = "SELECT state FROM pg_stat_activity WHERE pid = %s"


@contextlib.asynccontextmanager
async def opened(dsn: str) -> AsyncIterator[AnyioConnection]:
    conn = await connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def create_table(db: Database, schema_name: str, ddl: str) -> None:
    """Create the test's schema and a table in it (the dsn's search_path names it)."""
    await db.conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema_name)))
    await db.execute(ddl)


async def wait_until_running(db: Database, pid: int, query_prefix: str) -> None:
    """Poll pg_stat_activity (bounded) until backend ``pid`` runs a query starting so."""

    async def running() -> bool:
        return bool(
            await db.value(
                "SELECT count(*) = 1 FROM pg_stat_activity"
                " WHERE pid = %s AND state = 'active' AND query LIKE %s",
                (pid, query_prefix + "%"),
            )
        )

    await wait_until(running)


async def run_cancelled(db: Database, conn: AnyioConnection, query: str) -> float:
    """Run ``query`` on ``conn``, cancel it once the server runs it; return seconds taken.

    The cancellation comes from outside the query's task (a cancel scope), as a
    timeout or a shutdown would; the whole affair is bounded.
    """
    pid = conn.pgconn.backend_pid
    outcome: list[str] = []
    with anyio.fail_after(10):
        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def run_query() -> None:
                with scope:
                    await conn.execute(query)
                    outcome.append("finished")  # pragma: no cover - would be a failure
                outcome.append("cancelled" if scope.cancelled_caught else "not cancelled")

            tg.start_soon(run_query)
            await wait_until_running(db, pid, query[:20])
            scope.cancel()
        elapsed = anyio.current_time() - start
    assert outcome == ["cancelled"]
    return elapsed


# -- a real psycopg AsyncConnection ----------------------------------------------------


async def test_connect_gives_a_psycopg_async_connection_in_autocommit(dsn: str) -> None:
    async with opened(dsn) as conn:
        assert isinstance(conn, psycopg.AsyncConnection)
        assert isinstance(conn, AnyioConnection)
        assert conn.autocommit is True
        assert conn.pgconn.transaction_status == IDLE
        cur = await conn.execute("SELECT 1, 'two', NULL")
        assert await cur.fetchall() == [(1, "two", None)]


async def test_connect_without_autocommit_opens_a_transaction_lazily(dsn: str) -> None:
    conn = await connect(dsn, autocommit=False)
    try:
        assert conn.autocommit is False
        assert conn.pgconn.transaction_status == IDLE
        await conn.execute("SELECT 1")
        assert conn.pgconn.transaction_status == INTRANS
        await conn.rollback()
        assert conn.pgconn.transaction_status == IDLE
    finally:
        await conn.close()


async def test_parameters_are_adapted_both_ways(dsn: str) -> None:
    async with opened(dsn) as conn:
        cur = await conn.execute(
            "SELECT %s::int + 1, %s || '!', %s::jsonb, %s",
            (41, "héllo", psycopg.types.json.Jsonb({"a": [1, 2]}), None),
        )
        assert await cur.fetchone() == (42, "héllo!", {"a": [1, 2]}, None)
        named = await conn.execute("SELECT %(x)s::text, %(x)s::text", {"x": "same"})
        assert await named.fetchall() == [("same", "same")]


async def test_a_parameter_larger_than_the_socket_buffer_is_sent_whole(dsn: str) -> None:
    # Several megabytes fill the send buffer, so libpq asks to wait for the
    # socket to be readable or writable (psycopg's RW state).
    payload = "x" * (8 * 1024 * 1024)
    async with opened(dsn) as conn:
        with anyio.fail_after(20):
            cur = await conn.execute("SELECT length(%s), md5(%s)", (payload, payload))
            length, digest = await cur.fetchone() or (None, None)
        assert length == len(payload)
        assert digest == hashlib.md5(payload.encode()).hexdigest()
        assert conn.pgconn.transaction_status == IDLE


async def test_a_large_result_is_received_whole(dsn: str) -> None:
    async with opened(dsn) as conn:
        cur = await conn.execute("SELECT g, repeat('y', 100) FROM generate_series(1, 50000) g")
        rows = await cur.fetchall()
    assert len(rows) == 50000
    assert rows[0] == (1, "y" * 100)
    assert rows[-1][0] == 50000


async def test_transaction_blocks_commit_and_roll_back(
    dsn: str, db: Database, schema_name: str
) -> None:
    await create_table(db, schema_name, "CREATE TABLE items (n int PRIMARY KEY)")
    async with opened(dsn) as conn:
        async with conn.transaction():
            await conn.execute("INSERT INTO items VALUES (1)")
            assert conn.pgconn.transaction_status == INTRANS
            # Not visible from another connection before the commit.
            assert await db.value("SELECT count(*) FROM items") == 0
        assert conn.pgconn.transaction_status == IDLE

        async with conn.transaction():
            await conn.execute("INSERT INTO items VALUES (2)")
            raise psycopg.Rollback

        with pytest.raises(psycopg.errors.UniqueViolation):
            async with conn.transaction():
                await conn.execute("INSERT INTO items VALUES (3)")
                await conn.execute("INSERT INTO items VALUES (1)")
        assert conn.pgconn.transaction_status == IDLE

        async with conn.transaction():
            await conn.execute("INSERT INTO items VALUES (4)")
            async with conn.transaction():  # a savepoint
                await conn.execute("INSERT INTO items VALUES (5)")
                raise psycopg.Rollback
    assert await db.fetch("SELECT n FROM items ORDER BY n") == [(1,), (4,)]


async def test_cursors_client_side_server_side_and_executemany(
    dsn: str, db: Database, schema_name: str
) -> None:
    await create_table(db, schema_name, "CREATE TABLE items (n int, label text)")
    async with opened(dsn) as conn:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO items VALUES (%s, %s)", [(n, f"n{n}") for n in range(1, 101)]
            )
            await cur.execute("SELECT n, label FROM items WHERE n <= %s ORDER BY n", (3,))
            assert cur.rowcount == 3
            assert await cur.fetchone() == (1, "n1")
            assert await cur.fetchmany(5) == [(2, "n2"), (3, "n3")]
            assert await cur.fetchone() is None

        async with conn.transaction(), conn.cursor("server_side") as named:
            named.itersize = 7  # several FETCH round trips
            await named.execute("SELECT n FROM items ORDER BY n")
            seen = [row[0] async for row in named]
        assert seen == list(range(1, 101))

        async with conn.cursor() as cur:
            async with cur.copy("COPY items (n, label) FROM STDIN") as copy:
                for n in range(101, 111):
                    await copy.write_row((n, f"n{n}"))
            assert await db.value("SELECT count(*) FROM items") == 110
            rows = []
            async with cur.copy(
                "COPY (SELECT n FROM items WHERE n > 105 ORDER BY n) TO STDOUT"
            ) as copy:
                async for row in copy.rows():
                    rows.append(row)
            assert rows == [(str(n),) for n in range(106, 111)]
        assert conn.pgconn.transaction_status == IDLE


# -- the lock --------------------------------------------------------------------------


async def test_concurrent_queries_on_one_connection_take_turns(dsn: str) -> None:
    # psycopg's asyncio.Lock raises under trio as soon as a second task waits on it.
    results: dict[int, list[tuple[int, str]]] = {}

    async with opened(dsn) as conn:

        async def query(i: int) -> None:
            cur = await conn.execute(
                "SELECT %s::int, pg_sleep(0.01)::text FROM generate_series(1, 3)", (i,)
            )
            results[i] = await cur.fetchall()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(query, i)
        assert conn.lock.locked() is False
        assert conn.pgconn.transaction_status == IDLE
    assert results == {i: [(i, "")] * 3 for i in range(10)}


async def test_concurrent_transactions_on_one_connection_do_not_interleave(
    dsn: str, db: Database, schema_name: str
) -> None:
    await create_table(db, schema_name, "CREATE TABLE items (n int)")
    async with opened(dsn) as conn:
        lock = anyio.Lock()  # a transaction spans several statements: serialise blocks

        async def insert(i: int) -> None:
            async with lock, conn.transaction():
                await conn.execute("INSERT INTO items VALUES (%s)", (i,))
                await conn.execute("INSERT INTO items VALUES (%s)", (-i,))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(1, 11):
                    tg.start_soon(insert, i)
    assert await db.value("SELECT count(*) FROM items") == 20
    assert await db.value("SELECT sum(n) FROM items") == 0


# -- cancellation ------------------------------------------------------------------------


async def test_cancelling_a_running_query_cancels_it_on_the_server(dsn: str, db: Database) -> None:
    async with opened(dsn) as conn:
        pid = conn.pgconn.backend_pid
        elapsed = await run_cancelled(db, conn, "SELECT pg_sleep(30)")
        assert elapsed < 10
        # Not left ACTIVE with a result pending: idle and usable at once.
        assert conn.pgconn.transaction_status == IDLE
        assert conn.pgconn.status == pq.ConnStatus.OK
        assert conn.closed is False
        assert conn.lock.locked() is False
        # The server ran the cancel: the backend is idle, not still sleeping.
        assert await db.value(STATE_OF, (pid,)) == "idle"
        with anyio.fail_after(5):
            cur = await conn.execute("SELECT 42")
            assert await cur.fetchone() == (42,)
        assert conn.pgconn.backend_pid == pid


async def test_cancelling_with_move_on_after_leaves_the_connection_usable(dsn: str) -> None:
    async with opened(dsn) as conn:
        with anyio.fail_after(10):
            with anyio.move_on_after(0.3) as scope:
                await conn.execute("SELECT pg_sleep(30)")
            assert scope.cancelled_caught
            assert conn.pgconn.transaction_status == IDLE
            cur = await conn.execute("SELECT 'again'")
            assert await cur.fetchone() == ("again",)


async def test_cancelling_repeatedly_keeps_the_connection(dsn: str, db: Database) -> None:
    async with opened(dsn) as conn:
        pid = conn.pgconn.backend_pid
        for _ in range(3):
            await run_cancelled(db, conn, "SELECT pg_sleep(30)")
            assert conn.pgconn.transaction_status == IDLE
        cur = await conn.execute("SELECT pg_backend_pid()")
        assert await cur.fetchone() == (pid,)


async def test_cancel_safe_cancels_the_query_running_in_another_task(
    dsn: str, db: Database
) -> None:
    async with opened(dsn) as conn:
        pid = conn.pgconn.backend_pid
        errors: list[Exception] = []

        async def run_query() -> None:
            try:
                await conn.execute("SELECT pg_sleep(30)")
            except psycopg.errors.QueryCanceled as exc:
                errors.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_query)
                await wait_until_running(db, pid, "SELECT pg_sleep")
                await conn.cancel_safe(timeout=5)
        assert len(errors) == 1
        assert conn.pgconn.transaction_status == IDLE
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        # Nothing to cancel: returns at once.
        with anyio.fail_after(1):
            await conn.cancel_safe()


async def test_cancelling_in_an_explicit_transaction_aborts_it(
    dsn: str, db: Database, schema_name: str
) -> None:
    await create_table(db, schema_name, "CREATE TABLE items (n int)")
    async with opened(dsn) as conn:
        pid = conn.pgconn.backend_pid
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO items VALUES (1)")
        await run_cancelled(db, conn, "SELECT pg_sleep(30)")
        # The cancelled statement failed the transaction: aborted, not active.
        assert conn.pgconn.transaction_status == INERROR
        assert await db.value(STATE_OF, (pid,)) == "idle in transaction (aborted)"
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            await conn.execute("SELECT 1")
        await conn.rollback()
        assert conn.pgconn.transaction_status == IDLE
        cur = await conn.execute("SELECT count(*) FROM items")
        assert await cur.fetchone() == (0,)


async def test_cancelling_without_autocommit_aborts_the_transaction(dsn: str, db: Database) -> None:
    conn = await connect(dsn, autocommit=False)
    try:
        await run_cancelled(db, conn, "SELECT pg_sleep(30)")
        assert conn.pgconn.transaction_status == INERROR
        await conn.rollback()
        cur = await conn.execute("SELECT 7")
        assert await cur.fetchone() == (7,)
        await conn.commit()
        assert conn.pgconn.transaction_status == IDLE
    finally:
        await conn.close()


async def test_cancelling_inside_a_transaction_block_rolls_it_back(
    dsn: str, db: Database, schema_name: str
) -> None:
    await create_table(db, schema_name, "CREATE TABLE items (n int)")
    async with opened(dsn) as conn:
        pid = conn.pgconn.backend_pid
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def run_block() -> None:
                    with scope:
                        async with conn.transaction():
                            await conn.execute("INSERT INTO items VALUES (1)")
                            await conn.execute("SELECT pg_sleep(30)")

                tg.start_soon(run_block)
                await wait_until_running(db, pid, "SELECT pg_sleep")
                scope.cancel()
        # The block's end ran despite the still-cancelled scope: rolled back,
        # psycopg's bookkeeping out of the block, the connection idle again.
        assert conn.pgconn.transaction_status == IDLE
        assert conn._num_transactions == 0
        assert await db.value(STATE_OF, (pid,)) == "idle"
        assert await db.value("SELECT count(*) FROM items") == 0
        await conn.rollback()  # allowed again: not inside a block any more
        async with conn.transaction():
            await conn.execute("INSERT INTO items VALUES (2)")
        assert await db.fetch("SELECT n FROM items") == [(2,)]


async def create_slow_commit_table(db: Database, schema_name: str, seconds: float) -> None:
    """A table ``items`` whose rows each make COMMIT take ``seconds`` (a deferred trigger)."""
    await create_table(db, schema_name, "CREATE TABLE items (n int)")
    await db.execute(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$"
    )
    await db.execute(
        "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON items DEFERRABLE INITIALLY DEFERRED "
        "FOR EACH ROW EXECUTE FUNCTION slow_commit()"
    )


async def test_a_commit_slower_than_the_cancel_grace_is_waited_for(
    dsn: str, db: Database, schema_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The grace bounds the end of a cancelled block only: a normal COMMIT
    # that outlasts it completes, rather than being dropped with its rows.
    monkeypatch.setattr(_connection, "CANCEL_GRACE", 0.2)
    await create_slow_commit_table(db, schema_name, seconds=0.6)
    async with opened(dsn) as conn:
        with anyio.fail_after(10):
            async with conn.transaction():
                await conn.execute("INSERT INTO items VALUES (1)")
        assert conn.pgconn.status == pq.ConnStatus.OK
        assert conn.pgconn.transaction_status == IDLE
    assert await db.fetch("SELECT n FROM items") == [(1,)]


async def test_a_commit_interrupted_by_a_cancellation_raises_it(
    dsn: str, db: Database, schema_name: str
) -> None:
    await create_slow_commit_table(db, schema_name, seconds=30)
    async with opened(dsn) as conn:
        after_block: list[str] = []
        with anyio.fail_after(10):
            with anyio.move_on_after(0.5) as scope:
                async with conn.transaction():
                    await conn.execute("INSERT INTO items VALUES (1)")
                after_block.append("reached")  # pragma: no cover - would be a failure
        # The cancellation came out of the block: nobody takes the COMMIT for done.
        assert scope.cancelled_caught
        assert after_block == []
        # The COMMIT was cancelled on the server: nothing committed, and the
        # connection is out of the block, idle and usable.
        assert conn.pgconn.transaction_status == IDLE
        assert conn._num_transactions == 0
        cur = await conn.execute("SELECT count(*) FROM items")
        assert await cur.fetchone() == (0,)
    assert await db.value("SELECT count(*) FROM items") == 0


# -- notifications -----------------------------------------------------------------------


async def test_notification_read_with_the_notifies_generator(
    dsn: str, db: Database, schema_name: str
) -> None:
    channel = f"ch_{schema_name}"
    async with opened(dsn) as listener:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        await db.execute("SELECT pg_notify(%s, %s)", (channel, "hello"))
        with anyio.fail_after(5):
            received = await listener.wait(notifies(listener.pgconn))
        assert [(n.relname, n.extra, n.be_pid) for n in received] == [
            (channel.encode(), b"hello", db.conn.pgconn.backend_pid)
        ]
        # The connection is still good for queries.
        cur = await listener.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_waiting_for_a_notification_is_cancellable(dsn: str, schema_name: str) -> None:
    async with opened(dsn) as listener:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"ch_{schema_name}")))
        with anyio.fail_after(5):
            with anyio.move_on_after(0.1) as scope:
                await listener.wait(notifies(listener.pgconn))
            assert scope.cancelled_caught
            cur = await listener.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        assert listener.pgconn.transaction_status == IDLE


async def test_notify_handler_is_called(dsn: str, db: Database, schema_name: str) -> None:
    channel = f"ch_{schema_name}"
    received: list[psycopg.Notify] = []
    arrived = anyio.Event()

    def on_notify(notify: psycopg.Notify) -> None:
        received.append(notify)
        arrived.set()

    async with opened(dsn) as listener:
        listener.add_notify_handler(on_notify)
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        await db.execute("SELECT pg_notify(%s, %s)", (channel, "first"))
        # Delivered while waiting on the socket.
        with anyio.fail_after(5):
            await listener.wait(notifies(listener.pgconn))
            await arrived.wait()
        assert [(n.channel, n.payload) for n in received] == [(channel, "first")]

        # Delivered while the connection runs ordinary queries (polled, bounded).
        arrived = anyio.Event()
        await db.execute("SELECT pg_notify(%s, %s)", (channel, "second"))
        with anyio.fail_after(5):
            while not arrived.is_set():
                await listener.execute("SELECT 1")
                with anyio.move_on_after(0.02):
                    await arrived.wait()
        assert [(n.channel, n.payload, n.pid) for n in received] == [
            (channel, "first", db.conn.pgconn.backend_pid),
            (channel, "second", db.conn.pgconn.backend_pid),
        ]


async def test_psycopg_notifies_closed_with_aclosing_frees_the_lock(
    dsn: str, db: Database, schema_name: str
) -> None:
    channel = f"ch_{schema_name}"
    async with opened(dsn) as listener:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        await db.execute("SELECT pg_notify(%s, %s)", (channel, "one"))
        got: list[tuple[str, str]] = []
        with anyio.fail_after(5):
            async with contextlib.aclosing(listener.notifies()) as stream:
                async for notify in stream:
                    got.append((notify.channel, notify.payload))
                    break
        assert got == [(channel, "one")]
        assert listener.lock.locked() is False
        with anyio.fail_after(5):
            cur = await listener.execute("SELECT 'after'")
            assert await cur.fetchone() == ("after",)


async def test_psycopg_notifies_with_a_timeout_ends_without_notifications(
    dsn: str, schema_name: str
) -> None:
    async with opened(dsn) as listener:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(f"ch_{schema_name}")))
        with anyio.fail_after(5):
            start = anyio.current_time()
            got = [n async for n in listener.notifies(timeout=0.2)]
            elapsed = anyio.current_time() - start
        assert got == []
        assert 0.15 <= elapsed < 4
        assert listener.lock.locked() is False
        cur = await listener.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_psycopg_notifies_stop_after(dsn: str, db: Database, schema_name: str) -> None:
    channel = f"ch_{schema_name}"
    async with opened(dsn) as listener:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        for payload in ("a", "b"):
            await db.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        with anyio.fail_after(5):
            got = [n.payload async for n in listener.notifies(stop_after=2)]
        assert got == ["a", "b"]
        assert listener.lock.locked() is False


# -- failures ------------------------------------------------------------------------------


def live_params(conn: AnyioConnection) -> dict[str, str | None]:
    """The libpq parameters a connection was opened with (libpq's PQconninfo)."""
    return {
        option.keyword.decode(): None if option.val is None else option.val.decode()
        for option in conn.pgconn.info
    }


async def test_connect_fills_in_libpq_defaults_the_string_leaves_unset(dsn: str) -> None:
    async with opened(with_params(dsn, keepalives_idle="99")) as conn:
        params = live_params(conn)
    assert params["keepalives_idle"] == "99"  # what the string sets wins
    expected = {
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_interval": "10",
        "keepalives_count": "3",
        "tcp_user_timeout": "60000",
    }
    assert {key: params[key] for key in expected} == expected


async def test_connect_timeout_from_the_environment_wins_over_the_default(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    async with opened(dsn) as conn:
        assert live_params(conn)["connect_timeout"] == "7"


async def test_an_invalid_connect_timeout_is_refused(dsn: str) -> None:
    with anyio.fail_after(10), pytest.raises(DatabaseError) as info:
        await connect(with_params(dsn, connect_timeout="soon"))
    assert 'invalid integer value "soon" for connection option "connect_timeout"' in str(info.value)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connect_to_nothing_raises_database_error(server_dsn: str) -> None:
    conninfo = psycopg.conninfo.make_conninfo(
        server_dsn,
        host="127.0.0.1",
        hostaddr="127.0.0.1",
        port=str(free_port()),
        connect_timeout="5",
    )
    with anyio.fail_after(10):
        with pytest.raises(DatabaseError, match="cannot connect") as info:
            await connect(conninfo)
    assert info.value.__cause__ is None  # libpq's text may echo connection details


async def test_connect_to_an_unknown_database_raises(server_dsn: str) -> None:
    conninfo = psycopg.conninfo.make_conninfo(server_dsn, dbname="no_such_database_here")
    with anyio.fail_after(10):
        with pytest.raises(DatabaseError, match="no_such_database_here"):
            await connect(conninfo)


async def test_connection_terminated_by_the_server_raises_on_next_use(
    dsn: str, db: Database
) -> None:
    async with opened(dsn) as conn:
        pid = conn.pgconn.backend_pid
        assert await db.value("SELECT pg_terminate_backend(%s)", (pid,)) is True
        await db.wait_for(
            f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}", lambda n: n == 0
        )
        with anyio.fail_after(5):
            with pytest.raises(psycopg.OperationalError):
                await conn.execute("SELECT 1")
        assert conn.pgconn.status == pq.ConnStatus.BAD
        assert conn.lock.locked() is False


async def test_connection_terminated_during_a_query_raises(dsn: str, db: Database) -> None:
    async with opened(dsn) as conn:
        pid = conn.pgconn.backend_pid
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                errors: list[BaseException] = []

                async def run_query() -> None:
                    try:
                        await conn.execute("SELECT pg_sleep(30)")
                    except psycopg.OperationalError as exc:
                        errors.append(exc)

                tg.start_soon(run_query)
                await wait_until_running(db, pid, "SELECT pg_sleep")
                assert await db.value("SELECT pg_terminate_backend(%s)", (pid,)) is True
        assert len(errors) == 1
        assert conn.pgconn.status == pq.ConnStatus.BAD
