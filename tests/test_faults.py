"""Network faults, through a real TCP proxy (``tests/_proxy.py``).

The driver must never freeze the event loop, however the network misbehaves:
a ticker task measures the loop's largest stall while a connect or a cancel
talks to a server that does not answer. The listener must notice a link that
went silent and replace it. Every fault is a real socket; every wait is bounded.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import psycopg
import pytest
from psycopg import pq
from psycopg.conninfo import make_conninfo

from neoq_anyio import DatabaseError
from neoq_anyio._log import default_log
from neoq_anyio._pg._connection import connect
from neoq_anyio._postgres._listener import Listener

from ._proxy import open_proxy
from .conftest import wait_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .conftest import Database

# A stall this long means something blocked the loop: libpq holding the GIL
# for a whole connect or cancel stalls it for seconds. The bound leaves room
# for a loaded CI machine.
MAX_STALL = 0.5


class Ticker:
    """Ticks every 10 ms and records the largest delay of a tick (a loop stall)."""

    def __init__(self) -> None:
        self.largest_stall = 0.0

    async def run(self) -> None:
        while True:
            before = anyio.current_time()
            await anyio.sleep(0.01)
            self.largest_stall = max(self.largest_stall, anyio.current_time() - before - 0.01)


@asynccontextmanager
async def ticking() -> AsyncIterator[Ticker]:
    ticker = Ticker()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        yield ticker
        tg.cancel_scope.cancel()


async def test_connecting_to_a_silent_server_leaves_the_loop_running(server_dsn: str) -> None:
    async with open_proxy(server_dsn) as proxy:
        proxy.silence()
        async with ticking() as ticker:
            start = anyio.current_time()
            with anyio.fail_after(10), pytest.raises(DatabaseError) as info:
                await connect(proxy.conninfo(server_dsn, connect_timeout="1"))
            elapsed = anyio.current_time() - start
        assert proxy.accepted == 1
    assert "timeout expired" in str(info.value)
    assert f"port {proxy.port}" in str(info.value)
    assert 0.9 <= elapsed < 4  # connect_timeout is honoured...
    assert ticker.largest_stall < MAX_STALL  # ...without stalling the loop meanwhile


async def test_each_host_of_a_multi_host_string_gets_its_connect_timeout(server_dsn: str) -> None:
    async with open_proxy(server_dsn) as silent, open_proxy(server_dsn) as good:
        silent.silence()
        # The second host is a name, resolved through AnyIO; if it also
        # resolves to ::1, where nothing listens, that address fails at once.
        conninfo = make_conninfo(
            good.conninfo(server_dsn),
            host="127.0.0.1,localhost",
            port=f"{silent.port},{good.port}",
            connect_timeout="1",
        )
        async with ticking() as ticker:
            start = anyio.current_time()
            with anyio.fail_after(10):
                conn = await connect(conninfo)
            elapsed = anyio.current_time() - start
        try:
            assert conn.info.port == good.port
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        finally:
            await conn.close()
        assert (silent.accepted, good.accepted) == (1, 1)
    assert 0.9 <= elapsed < 5  # the first host had its 1 s, then the next one was tried
    assert ticker.largest_stall < MAX_STALL


async def test_cancelling_over_a_silent_link_leaves_the_loop_running(
    server_dsn: str, db: Database
) -> None:
    async with open_proxy(server_dsn) as proxy:
        conn = await connect(proxy.conninfo(server_dsn))
        conn.cancel_grace = 1.0
        pid = conn.pgconn.backend_pid
        scope = anyio.CancelScope()

        async def run_query() -> None:
            with scope:
                await conn.execute("SELECT pg_sleep(30)")

        try:
            with anyio.fail_after(15):
                async with ticking() as ticker, anyio.create_task_group() as tg:
                    tg.start_soon(run_query)
                    await db.wait_for(
                        f"SELECT state FROM pg_stat_activity WHERE pid = {pid}",
                        lambda state: state == "active",
                    )
                    proxy.silence()
                    # psycopg's cancel_safe(): the request gets no answer.
                    with pytest.raises(psycopg.errors.CancellationTimeout):
                        await conn.cancel_safe(timeout=0.5)
                    # A cancelled query: the cancel request gets no answer
                    # either, so after cancel_grace the connection is closed.
                    start = anyio.current_time()
                    scope.cancel()
                elapsed = anyio.current_time() - start
            assert scope.cancelled_caught
            assert conn.pgconn.status == pq.ConnStatus.BAD
            assert 0.9 <= elapsed < 4
            assert ticker.largest_stall < MAX_STALL
        finally:
            await conn.close()
            await db.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def test_delayed_and_cut_links(server_dsn: str) -> None:
    async with open_proxy(server_dsn) as proxy:
        conn = await connect(proxy.conninfo(server_dsn))
        try:
            with anyio.fail_after(10):
                proxy.delay(0.2)
                start = anyio.current_time()
                cur = await conn.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
                assert anyio.current_time() - start >= 0.4  # 0.2 s each way
                proxy.pass_through()
                assert proxy.links == 1
                proxy.cut()
                with pytest.raises(psycopg.OperationalError):
                    await conn.execute("SELECT 1")
                assert conn.pgconn.status == pq.ConnStatus.BAD
                await wait_until(lambda: proxy.links == 0)
        finally:
            await conn.close()


async def test_the_listener_replaces_a_silenced_link(
    server_dsn: str, db: Database, schema_name: str
) -> None:
    first, second = f"a_{schema_name}", f"b_{schema_name}"
    heard: list[tuple[str, str]] = []
    news = anyio.Event()
    reconnected = anyio.Event()

    def on_notify(channel: str, payload: str) -> None:
        nonlocal news
        heard.append((channel, payload))
        news.set()

    async def hear(channel: str, payload: str) -> None:
        nonlocal news
        news = anyio.Event()
        await db.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        await news.wait()

    async with open_proxy(server_dsn) as proxy:
        listener = Listener(
            lambda: connect(proxy.conninfo(server_dsn, connect_timeout="5")),
            on_notify,
            reconnected.set,
            log=default_log(),
            ping_interval=0.2,
            ping_timeout=0.5,
        )
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(listener.run)
                await listener.listen(first)
                await hear(first, "before")

                # The link goes silent while the listener waits: its ping
                # gets no answer, so it drops the link and dials again.
                proxy.silence()
                start = anyio.current_time()
                await wait_until(lambda: proxy.accepted == 2)
                noticed = anyio.current_time() - start
                proxy.pass_through()
                await reconnected.wait()
                assert listener.reconnects == 1
                await hear(first, "after")

                # Silent while a LISTEN is under way: the LISTEN is bounded too.
                proxy.silence()
                listened = anyio.Event()

                async def listen_second() -> None:
                    await listener.listen(second)
                    listened.set()

                tg.start_soon(listen_second)
                await wait_until(lambda: proxy.accepted == 3)
                proxy.pass_through()
                await listened.wait()
                await hear(second, "again")
                tg.cancel_scope.cancel()
    assert noticed < 0.2 + 0.5 + 1.5  # ping_interval + ping_timeout, and some slack
    assert listener.reconnects == 2
    assert heard == [(first, "before"), (first, "after"), (second, "again")]
