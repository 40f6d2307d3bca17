"""Input rules: the same on both backends, checked before anything is stored.

Queue names are 1 to 63 UTF-8 bytes (PostgreSQL's channel-name limit) and
not blank; payload strings hold no NUL (``jsonb`` refuses it) and no lone
surrogate; options stay within what PostgreSQL can take. Each refusal is a
typed error raised before the job reaches storage, so the tests count what
was stored afterwards: rows in the test's schema on PostgreSQL, and
``neoq_anyio.testing.enqueued`` on both.

Also here: ``search_path`` entries are read as PostgreSQL reads them
(case folding, quotes, ``$user``) when neoq creates its schema.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql

from neoq_anyio import (
    Backend,
    ConfigurationError,
    ConnectionStringError,
    Handler,
    InvalidJobError,
    Job,
    NoQueueError,
    open_backend,
)
from neoq_anyio._fingerprint import encode_payload
from neoq_anyio._memory import MemoryBackend
from neoq_anyio._pg._connection import connect
from neoq_anyio._postgres._schema import schema_to_create, search_path_names
from neoq_anyio._postgres._sql import idle_timeout_ms
from neoq_anyio.testing import drain, enqueued

from .conftest import with_params
from .test_backends import opened
from .test_processing import FAST

# Every cron field listed in full: its description, snake_cased, is far over 63 bytes.
LONG_NAMED_SPEC = "1,2,3,4,5,6,7 1-5 1,15 JAN-MAR MON-FRI"


async def stored_rows(nq: Backend, connection_string: str) -> int:
    """Jobs stored anywhere: the backend's view, and on PostgreSQL the tables themselves."""
    seen = len(await enqueued(nq))
    if connection_string != "memory://":
        conn = await connect(connection_string)
        try:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM neoq_jobs) + (SELECT count(*) FROM neoq_dead_jobs)"
            )
            row = await cur.fetchone()
        finally:
            await conn.close()
        assert row is not None
        assert row[0] == seen
    return seen


async def _nothing(job: Job) -> None:
    pass


# -- queue names ---------------------------------------------------------------------------


async def test_bad_queue_names_are_refused_before_anything_is_stored(
    connection_string: str,
) -> None:
    longest = "é" * 31 + "x"  # 63 bytes in UTF-8: the longest name that works
    ran = anyio.Event()

    async def handle(job: Job) -> None:
        ran.set()

    async with opened(connection_string) as nq:
        with pytest.raises(NoQueueError):
            await nq.enqueue(Job(""))
        for blank in (" ", "\t\n "):
            with pytest.raises(InvalidJobError, match="blank") as info:
                await nq.enqueue(Job(blank))
            assert not isinstance(info.value, NoQueueError)
        for too_long in ("q" * 64, "é" * 32):  # 64 bytes; "é" * 32 is 32 characters
            with pytest.raises(InvalidJobError, match="64 bytes"):
                await nq.enqueue(Job(too_long, {"n": 1}))
        with pytest.raises(InvalidJobError, match="NUL"):
            await nq.enqueue(Job("a\x00b"))
        assert await stored_rows(nq, connection_string) == 0

        # The limit is exact: a 63-byte queue is listened to and its job runs.
        await nq.start(Handler(longest, handle))
        await nq.enqueue(Job(longest, {"n": 1}))
        with anyio.fail_after(10):
            await ran.wait()
        await drain(nq)
        [job] = await enqueued(nq)
        assert (job.queue, job.status) == (longest, "processed")


def test_handlers_refuse_bad_queue_names() -> None:
    for bad in (" ", "\t", "q" * 64, "é" * 32, "a\x00b"):
        with pytest.raises(ConfigurationError):
            Handler(bad, _nothing)
    with pytest.raises(ConfigurationError, match="str"):
        Handler(5, _nothing)  # type: ignore[arg-type]
    assert Handler("", _nothing).queue == ""  # start_cron names it from the schedule
    assert Handler("é" * 31 + "x", _nothing).queue


async def test_cron_with_a_too_long_derived_queue_name_is_refused(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        with pytest.raises(ConfigurationError, match="give the Handler a queue name") as info:
            await nq.start_cron(LONG_NAMED_SPEC, Handler("", _nothing))
        assert "63" in str(info.value)
        assert nq.statistics().queues == ()  # nothing started, nothing scheduled
        # Named explicitly, the same schedule is fine.
        handler = await nq.start_cron(LONG_NAMED_SPEC, Handler("named", _nothing))
        assert handler.queue == "named"
        assert nq.statistics().queues == ("named",)


# -- payloads ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        pytest.param({"a": "x\x00y"}, "the string at payload['a'] contains NUL", id="value"),
        pytest.param(
            {"user": {"tags": ["ok", "b\x00d"]}},
            "the string at payload['user']['tags'][1] contains NUL",
            id="nested",
        ),
        pytest.param(
            {"user": {"k\x00": 1}}, "the key at payload['user']['k\\x00'] contains NUL", id="key"
        ),
        pytest.param(
            {"s": ["\ud800"]}, "the string at payload['s'][0] contains a lone surrogate", id="utf8"
        ),
    ],
)
async def test_unstorable_payload_strings_are_refused_with_their_path(
    connection_string: str, payload: dict[str, Any], where: str
) -> None:
    async with opened(connection_string) as nq:
        with pytest.raises(InvalidJobError) as info:
            await nq.enqueue(Job("q", payload))
        assert str(info.value).startswith(where), str(info.value)
        assert await stored_rows(nq, connection_string) == 0
        # Backslash-u-0000 written out is six ordinary characters: stored as given.
        literal = {"text": "\\u0000", "é": "\u2028"}
        await nq.enqueue(Job("q", literal))
        [job] = await enqueued(nq)
        assert job.payload == literal


def test_checking_payload_strings_keeps_go_neoqs_fingerprint() -> None:
    for payload, go_json in [
        ({"text": "\\u0000"}, '{"text":"\\\\u0000"}'),
        ({"é": "\u2028<"}, '{"é":"\\u2028\\u003c"}'),
        ({"f": 1.0, "n": [None, "x"]}, '{"f":1,"n":[null,"x"]}'),
    ]:
        text, fingerprint = encode_payload("queue", payload)
        assert fingerprint == hashlib.md5(("queue" + go_json).encode()).hexdigest()
        assert text is not None


async def test_other_unstorable_fields_are_refused(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        for job in (
            Job("q", fingerprint="a\x00b"),
            Job("q", fingerprint=7),  # type: ignore[arg-type]
            Job("q", max_retries=2**31),  # past PostgreSQL's integer
        ):
            with pytest.raises(InvalidJobError):
                await nq.enqueue(job)
        assert await stored_rows(nq, connection_string) == 0
        await nq.enqueue(Job("q", max_retries=2**31 - 1))
        [job] = await enqueued(nq)
        assert job.max_retries == 2**31 - 1


# -- open_backend ------------------------------------------------------------------------


async def test_none_is_not_a_connection_string() -> None:
    with pytest.raises(ConnectionStringError, match="memory://"):
        async with open_backend(None):  # type: ignore[arg-type]
            pytest.fail("the body must not run")
    with pytest.raises(ConnectionStringError):
        async with open_backend(""):
            pytest.fail("the body must not run")
    async with open_backend() as nq:  # left out: the in-memory backend
        assert isinstance(nq, MemoryBackend)


def _longest_transaction_timeout() -> int:
    """The most whole seconds whose idle_in_transaction_session_timeout PostgreSQL takes."""
    low, high = 1, 10**9
    while low < high:
        mid = (low + high + 1) // 2
        if idle_timeout_ms(mid) <= 2**31 - 1:
            low = mid
        else:
            high = mid - 1
    return low


async def test_transaction_timeout_within_postgres_int_range(connection_string: str) -> None:
    longest = _longest_transaction_timeout()
    assert longest > 20 * 86400  # about 22 days, with the margin sessions add
    for too_long in (longest + 1, timedelta(days=30)):
        with pytest.raises(ConfigurationError, match="transaction_timeout"):
            async with opened(connection_string, transaction_timeout=too_long):
                pytest.fail("the body must not run")
    # The largest value PostgreSQL takes works: sessions are set up with it.
    async with opened(connection_string, transaction_timeout=longest) as nq:
        await nq.enqueue(Job("q"))
        assert len(await enqueued(nq)) == 1


# -- search_path -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "names"),
    [
        ('"MySchema"', ["MySchema"]),
        ("MySchema", ["myschema"]),
        ('"My Schema",public', ["My Schema", "public"]),
        (' "we""ird" , X ,"a,b"', ['we"ird', "x", "a,b"]),
        ('"$user", public', ["$user", "public"]),
        ("$user,Other", ["$user", "other"]),
        ("ÉCOLE", ["École"]),  # only ASCII letters fold
        ("x" * 70, ["x" * 63]),
        ('"' + "é" * 40 + '"', ["é" * 31]),  # cut on a character boundary
        ("", []),
    ],
)
def test_search_path_is_read_as_postgresql_reads_it(setting: str, names: list[str]) -> None:
    assert search_path_names(setting) == names


def test_the_first_schema_named_is_created_unless_an_earlier_one_is_in_use() -> None:
    def create(*names: str, current: str | None = None) -> str | None:
        return schema_to_create(list(names), current=current, user="ada")

    assert create("app", "public", current="public") == "app"
    assert create("$user", "public", current="public") is None  # PostgreSQL's default
    assert create("$user", "app", current="ada") is None  # the role's schema exists
    assert create("$user", "app", current=None) == "app"
    assert create("pg_temp", "app") == "app"  # pg_* cannot be created
    assert create("$user") == "ada"
    assert create("app", current="app") is None
    assert create() is None


@pytest.fixture
def cleanup(server_dsn: str) -> Iterator[list[str]]:
    """Schemas and roles a test creates; dropped afterwards."""
    made: list[str] = []
    yield made
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        for name in made:
            if name.startswith("role:"):
                role = sql.Identifier(name[5:])
                conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(role))
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))
            else:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
                )


async def _jobs_in(server_dsn: str, schema: str) -> int | None:
    """Rows in ``schema``'s neoq_jobs, read from outside; None if it has no such table."""
    conn = await connect(server_dsn)
    try:
        cur = await conn.execute(
            "SELECT to_regclass(format('%%I.neoq_jobs', %s::text)) IS NOT NULL", (schema,)
        )
        row = await cur.fetchone()
        if not (row and row[0]):
            return None
        cur = await conn.execute(
            sql.SQL("SELECT count(*) FROM {}.neoq_jobs").format(sql.Identifier(schema))
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])
    finally:
        await conn.close()


async def test_startup_creates_the_schema_search_path_names(
    server_dsn: str, cleanup: list[str]
) -> None:
    tag = uuid.uuid4().hex[:8]
    fallback = f"fallback{tag}"  # exists, and comes second: tables must not land there
    # (the search_path option as libpq takes it, the schema PostgreSQL then uses)
    cases = [
        (f'"Mixed{tag}"', f"Mixed{tag}"),
        (f"Mixed{tag}", f"mixed{tag}"),
        (f'"My\\ Schema{tag}",{fallback}', f"My Schema{tag}"),
        (f'"q""uote{tag}"', f'q"uote{tag}'),
        (f"$user,Other{tag},{fallback}", f"other{tag}"),
    ]
    cleanup.extend([fallback, "$user", *(schema for _, schema in cases)])
    conn = await connect(server_dsn)
    try:
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(fallback)))
    finally:
        await conn.close()
    for option, schema in cases:
        dsn = with_params(server_dsn, options=f"-csearch_path={option}")
        with anyio.fail_after(20):
            async with open_backend(dsn, **FAST) as nq:
                await nq.enqueue(Job("q"))
        assert await _jobs_in(server_dsn, schema) == 1, option
    assert await _jobs_in(server_dsn, fallback) is None
    assert await _jobs_in(server_dsn, "$user") is None

    # "$user" alone: the schema named after the current role.
    role = f"neoq_role_{tag}"
    cleanup.insert(0, f"role:{role}")
    conn = await connect(server_dsn)
    try:
        await conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        cur = await conn.execute("SELECT current_database()")
        row = await cur.fetchone()
        assert row is not None
        await conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(row[0]), sql.Identifier(role)
            )
        )
    finally:
        await conn.close()
    dsn = with_params(server_dsn, options=f"-crole={role} -csearch_path=$user")
    with anyio.fail_after(20):
        async with open_backend(dsn, **FAST) as nq:
            await nq.enqueue(Job("q"))
    assert await _jobs_in(server_dsn, role) == 1
