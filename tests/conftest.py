"""Test fixtures: a real PostgreSQL, and every async test on asyncio and trio.

Rules for tests in this suite:

* Every ``async def`` test runs twice, on asyncio and on trio (the
  ``anyio_backend`` fixture below); nothing is mocked: tests talk to a real
  PostgreSQL.
* Without ``NEOQ_TEST_DSN`` the session starts an embedded PostgreSQL
  (``pgserver``) in a temporary directory; with it, tests use that server,
  and restart it (for the tests that need a restart) with the shell command
  in ``NEOQ_TEST_RESTART_COMMAND``; without that command those tests skip.
* Each test gets a schema of its own (``dsn`` fixture: a connection string
  whose search_path names a fresh schema), so tests cannot see each other's
  jobs.
* Every test is bounded: pytest-timeout stops any test after 60 s, and tests
  that wait for something wrap the wait in ``anyio.fail_after``.
* Synchronise with events (a handler sets an ``anyio.Event``), never with
  sleeps; where a test must observe the database, poll it with a bound
  (``wait_for``).
* No fake clock on PostgreSQL tests: the database's clock is real. Use short
  intervals instead.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from neoq_anyio._pg._connection import AnyioConnection, connect


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param  # type: ignore[no-any-return]


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    # Every coroutine test runs under AnyIO's plugin, on both loops. Marking
    # here, before AnyIO's own hook, lets it parametrize ``anyio_backend``.
    if collector.funcnamefilter(name) and inspect.iscoroutinefunction(obj):  # type: ignore[attr-defined]
        pytest.mark.anyio(obj)


class Server:
    """The PostgreSQL the tests use; ``restart`` is None for an external server
    without ``NEOQ_TEST_RESTART_COMMAND``."""

    def __init__(self, dsn: str, restart: Callable[[], None] | None = None) -> None:
        self.dsn = dsn
        self.restart = restart


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    given = os.environ.get("NEOQ_TEST_DSN")
    if given:
        command = os.environ.get("NEOQ_TEST_RESTART_COMMAND", "").strip()
        yield Server(given, restart_with(command, given) if command else None)
        return
    import pgserver
    from pgserver._commands import pg_ctl

    datadir = tempfile.mkdtemp(prefix="neoq-pg-")
    embedded = pgserver.get_server(datadir, cleanup_mode="stop")

    def restart() -> None:
        pg_ctl(
            ["-w", "-m", "fast", "restart"],
            pgdata=embedded.pgdata,
            user=embedded.system_user,
            timeout=30,
        )

    try:
        yield Server(embedded.get_uri(), restart)
    finally:
        embedded.cleanup()
        shutil.rmtree(datadir, ignore_errors=True)


def restart_with(command: str, dsn: str) -> Callable[[], None]:
    """Restart an external server: run ``command`` in a shell (bounded). The
    command must return once the server accepts connections again, as
    ``pg_ctlcluster ... restart`` and ``pg_ctl -w restart`` do; a connection
    checks that it did."""

    def restart() -> None:
        subprocess.run(command, shell=True, check=True, timeout=120)
        with psycopg.connect(dsn, connect_timeout=10):
            pass

    return restart


@pytest.fixture(scope="session")
def server_dsn(server: Server) -> str:
    """A libpq conninfo for a database the tests may create schemas in."""
    return server.dsn


def with_params(dsn: str, **params: str) -> str:
    """The same connection string as libpq key=value, with some params set."""
    return make_conninfo(dsn, **params)


@pytest.fixture(params=["postgres", "memory"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    """Which backend a test written for both runs on."""
    return str(request.param)


@pytest.fixture
def connection_string(backend_kind: str, request: pytest.FixtureRequest) -> str:
    """The connection string of ``backend_kind``: the test's schema, or memory."""
    return str(request.getfixturevalue("dsn")) if backend_kind == "postgres" else "memory://"


@pytest.fixture
def schema_name() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def dsn(server_dsn: str, schema_name: str) -> Iterator[str]:
    """A connection string whose search_path is a fresh, not yet created schema."""
    # application_name tells this test's sessions apart in pg_stat_activity.
    yield with_params(
        server_dsn, options=f"-csearch_path={schema_name}", application_name=schema_name
    )
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema_name))
        )


class Database:
    """Direct SQL access for assertions, on either loop."""

    def __init__(self, conn: AnyioConnection) -> None:
        self.conn = conn

    async def fetch(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cur = await self.conn.execute(query.encode(), params or None)
        return await cur.fetchall() if cur.description else []

    async def value(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        rows = await self.fetch(query, params)
        return rows[0][0] if rows else None

    async def execute(self, query: str, params: tuple[Any, ...] = ()) -> None:
        await self.conn.execute(query.encode(), params or None)

    async def wait_for(
        self, query: str, predicate: Callable[[Any], bool], *, timeout: float = 10.0
    ) -> Any:
        """Poll ``query``'s first value until ``predicate`` holds (bounded)."""
        with anyio.fail_after(timeout):
            while True:
                value = await self.value(query)
                if predicate(value):
                    return value
                await anyio.sleep(0.02)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[Database]:
    """An autocommit connection in the test's schema (which may not exist yet)."""
    conn = await connect(dsn)
    try:
        await conn.execute("SET TimeZone = 'UTC'")
        yield Database(conn)
    finally:
        await conn.close()


def dbname_of(dsn: str) -> str:
    return conninfo_to_dict(dsn).get("dbname") or "postgres"


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0
) -> None:
    """Wait, bounded, until ``predicate()`` holds; checks every 10 ms."""
    with anyio.fail_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await anyio.sleep(0.01)
