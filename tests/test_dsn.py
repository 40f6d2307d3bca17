"""Tests for neoq_anyio._dsn: connection strings, pool options and password safety."""

from __future__ import annotations

import logging
import os
import re
import socket
from typing import TYPE_CHECKING

import anyio
import pytest
from psycopg.conninfo import conninfo_to_dict

from neoq_anyio import open_backend
from neoq_anyio._exceptions import ConfigurationError, ConnectionStringError, DatabaseError
from neoq_anyio._pg._dsn import (
    POOL_OPTION_NAMES,
    ConnectionSettings,
    parse_connection_string,
)
from neoq_anyio._pg._pool_options import PoolOptions, PoolOptionsError

if TYPE_CHECKING:
    from collections.abc import Iterator

SECRET = "s3cr3t"
DEFAULT_MAX_CONNS = max(4, os.cpu_count() or 1)


def params_of(settings: ConnectionSettings) -> dict[str, object]:
    """The libpq parameters of ``settings.conninfo``, parsed back by libpq."""
    return dict(conninfo_to_dict(settings.conninfo))


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and every exception reachable through __cause__ and __context__."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]


# --- valid strings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "postgres://app:pw@db:5432/app",
            {"user": "app", "password": "pw", "host": "db", "port": "5432", "dbname": "app"},
            id="url-postgres",
        ),
        pytest.param(
            "postgresql://app@db/app?sslmode=disable&application_name=worker",
            {
                "user": "app",
                "host": "db",
                "dbname": "app",
                "sslmode": "disable",
                "application_name": "worker",
            },
            id="url-postgresql-with-query",
        ),
        pytest.param(
            "POSTGRESQL://app@db/app", {"user": "app", "host": "db", "dbname": "app"}, id="url-caps"
        ),
        pytest.param("  postgres://db/app \n", {"host": "db", "dbname": "app"}, id="url-spaces"),
        pytest.param(
            "postgres://app:p%40ss%2Fw%3Ard@db/app",
            {"user": "app", "password": "p@ss/w:rd", "host": "db", "dbname": "app"},
            id="url-percent-encoded-password",
        ),
        pytest.param(
            "postgres://app:pa?ss@db/app",
            {"user": "app", "password": "pa?ss", "host": "db", "dbname": "app"},
            id="url-raw-question-mark-in-password",
        ),
        pytest.param(
            "postgresql://app:p@ss@db/app",
            {"user": "app", "password": "p@ss", "host": "db", "dbname": "app"},
            id="url-raw-at-sign-in-password",
        ),
        pytest.param(
            "postgres://me@corp:p@s@s@db:5432/app?application_name=a@b",
            {
                "user": "me@corp",
                "password": "p@s@s",
                "host": "db",
                "port": "5432",
                "dbname": "app",
                "application_name": "a@b",
            },
            id="url-raw-at-signs-in-user-password-and-query",
        ),
        pytest.param(
            "postgres://u@h1:5432,h2:5433/app",
            {"user": "u", "host": "h1,h2", "port": "5432,5433", "dbname": "app"},
            id="url-multi-host",
        ),
        pytest.param(
            "postgres://u@h1,h2:5433/app",
            {"user": "u", "host": "h1,h2", "port": ",5433", "dbname": "app"},
            id="url-multi-host-default-port",
        ),
        pytest.param(
            "postgresql://u@[::1]:5432/app",
            {"user": "u", "host": "::1", "port": "5432", "dbname": "app"},
            id="url-ipv6",
        ),
        pytest.param(
            "postgres:///app?host=/var/run/postgresql",
            {"host": "/var/run/postgresql", "dbname": "app"},
            id="url-socket",
        ),
        pytest.param("postgres://", {}, id="url-bare"),
        pytest.param(
            "host=db port=5432 user=app password=pw dbname=app",
            {"user": "app", "password": "pw", "host": "db", "port": "5432", "dbname": "app"},
            id="dsn",
        ),
        pytest.param(
            "host = db\tdbname =  'my app'  password='it\\'s \\\\ here'",
            {"host": "db", "dbname": "my app", "password": "it's \\ here"},
            id="dsn-quoting-and-spaces",
        ),
        pytest.param(
            "dbname='a'host=db", {"dbname": "a", "host": "db"}, id="dsn-quoted-value-then-key"
        ),
        pytest.param("host=my\\ host", {"host": "my host"}, id="dsn-escaped-space-unquoted"),
        pytest.param("password= host=db", {"password": "host=db"}, id="dsn-libpq-space-rule"),
        pytest.param("dbname=app", {"dbname": "app"}, id="dsn-single"),
        pytest.param("password=pw\\", {"password": "pw"}, id="dsn-trailing-backslash"),
    ],
)
def test_parse_valid(text: str, expected: dict[str, str]) -> None:
    settings = parse_connection_string(text)
    assert params_of(settings) == expected
    assert settings.password == expected.get("password")
    assert settings.pool == PoolOptions()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "postgres://app:pw@db/app?pool_max_conns=10&options=-csearch_path%3Dfoo"
            "&pool_min_conns=2&pool_max_conn_lifetime=1h30m&pool_max_conn_idle_time=250ms"
            "&pool_health_check_period=30s&pool_max_conn_lifetime_jitter=1m",
            id="url",
        ),
        pytest.param(
            "pool_max_conns=10 host=db pool_min_conns = '2' user=app password=pw "
            "pool_max_conn_lifetime=1h30m dbname=app pool_max_conn_idle_time=250ms "
            "options='-csearch_path=foo' pool_health_check_period=30s "
            "pool_max_conn_lifetime_jitter=1m",
            id="dsn",
        ),
    ],
)
def test_pool_options_are_parsed_and_removed(text: str) -> None:
    settings = parse_connection_string(text)
    assert settings.pool == PoolOptions(
        max_conns=10,
        min_conns=2,
        max_conn_lifetime=5400.0,
        max_conn_idle_time=0.25,
        health_check_period=30.0,
        max_conn_lifetime_jitter=60.0,
    )
    assert "pool_" not in settings.conninfo
    assert params_of(settings) == {
        "host": "db",
        "user": "app",
        "password": "pw",
        "dbname": "app",
        "options": "-csearch_path=foo",
    }


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("postgres://db/app?pool_max_conns=3&pool_max_conns=7", id="url"),
        pytest.param("host=db pool_max_conns=3 pool_max_conns=7", id="dsn"),
    ],
)
def test_repeated_pool_option_last_wins(text: str) -> None:
    assert parse_connection_string(text).pool.max_conns == 7


def test_url_with_only_pool_options_drops_the_query() -> None:
    settings = parse_connection_string("postgres://db/app?pool_max_conns=3")
    assert params_of(settings) == {"host": "db", "dbname": "app"}


def test_percent_encoded_pool_option_value() -> None:
    settings = parse_connection_string("postgres://db/app?pool_max_conn_lifetime=1%C2%B5s")
    assert settings.pool.max_conn_lifetime == pytest.approx(1e-6)


def test_pool_defaults() -> None:
    pool = parse_connection_string("host=db").pool
    assert pool == PoolOptions(
        max_conns=DEFAULT_MAX_CONNS,
        min_conns=0,
        max_conn_lifetime=3600.0,
        max_conn_idle_time=1800.0,
        health_check_period=60.0,
        max_conn_lifetime_jitter=0.0,
    )


def test_min_conns_up_to_default_max() -> None:
    pool = parse_connection_string(f"host=db pool_min_conns={DEFAULT_MAX_CONNS}").pool
    assert pool.min_conns == pool.max_conns == DEFAULT_MAX_CONNS


def test_pool_only_dsn_means_libpq_defaults() -> None:
    settings = parse_connection_string("pool_max_conns=2")
    assert settings.conninfo == ""
    assert settings.pool.max_conns == 2
    assert settings.describe() == "(libpq defaults)"


# --- invalid strings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "connection string is empty", id="empty"),
        pytest.param(" \t\n", "connection string is empty", id="whitespace"),
        pytest.param("host=db\x00x", "connection string contains a NUL character", id="nul"),
        pytest.param("host=db\ud800", "lone surrogate", id="surrogate"),
        pytest.param(
            "mysql://u@h/db",
            "unsupported connection string scheme 'mysql': use postgres:// or postgresql://",
            id="scheme-mysql",
        ),
        pytest.param("http://h/db", "unsupported connection string scheme 'http'", id="http"),
        pytest.param("host=db foo=bar", 'invalid connection option "foo"', id="dsn-unknown"),
        pytest.param("=db", 'invalid connection option ""', id="dsn-empty-key"),
        pytest.param("postgres://h/db?foo=bar", 'invalid URI query parameter: "foo"', id="url-unk"),
        pytest.param(
            "host=db pool_size=3",
            "unknown pool option 'pool_size' (known: pool_max_conns, pool_min_conns,",
            id="unknown-pool-option-dsn",
        ),
        pytest.param(
            "postgres://h/db?pool_size=3", "unknown pool option 'pool_size'", id="unknown-pool-url"
        ),
        pytest.param("dbname app", "missing '=' after 'dbname'", id="dsn-missing-equals"),
        pytest.param(
            "localhost:5432",
            "expected key=value pairs or a postgres:// or postgresql:// URL",
            id="not-a-connection-string",
        ),
        pytest.param(
            "host=db application_name='x",
            "unterminated quoted value for 'application_name'",
            id="dsn-unterminated-quote",
        ),
        pytest.param(
            "postgres://h/db?sslmode", "URL query parameter 1 has no '='", id="url-query-no-equals"
        ),
        pytest.param(
            "postgres://h/db?options=-csearch_path=x",
            "the value of URL query parameter 'options' contains '='",
            id="url-query-extra-equals",
        ),
        pytest.param(
            "postgres://h/d%zzb",
            "invalid percent-encoding in the URL's database name",
            id="url-bad-percent",
        ),
        pytest.param(
            "postgres://h%00/db", "the URL's host or port contains %00", id="url-percent-nul"
        ),
        pytest.param(
            "postgres://u@[::1/db", "libpq could not parse the URL", id="url-unclosed-bracket"
        ),
    ],
)
def test_parse_invalid(text: str, message: str) -> None:
    with pytest.raises(ConnectionStringError, match=re.escape(message)):
        parse_connection_string(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("host=db port=abc", "invalid port 'abc'", id="dsn-word"),
        pytest.param("host=db port=0", "invalid port '0'", id="dsn-zero"),
        pytest.param("host=db port=65536", "invalid port '65536'", id="dsn-too-large"),
        pytest.param("host=a,b port=5432,x", "invalid port '5432,x'", id="dsn-list"),
        pytest.param("postgres://h:notaport/db", "invalid port in the URL", id="url-word"),
        pytest.param("postgres://h/db?port=x", "invalid port in the URL", id="url-query"),
    ],
)
def test_non_numeric_port_is_rejected(text: str, message: str) -> None:
    with pytest.raises(ConnectionStringError, match=re.escape(message)):
        parse_connection_string(text)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("pool_max_conns", "0", "must be an integer greater than 0"),
        ("pool_max_conns", "-1", "must be an integer greater than 0"),
        ("pool_max_conns", "ten", "must be an integer greater than 0"),
        ("pool_max_conns", "1.5", "must be an integer greater than 0"),
        ("pool_max_conns", "", "must be an integer greater than 0"),
        ("pool_max_conns", "2147483648", "must be at most 2147483647"),
        ("pool_max_conns", "9" * 5000, "must be at most 2147483647"),
        ("pool_min_conns", "-1", "must be an integer greater than or equal to 0"),
        ("pool_min_conns", "x", "must be an integer greater than or equal to 0"),
        ("pool_min_conns", "999", f"must not exceed pool_max_conns ({DEFAULT_MAX_CONNS})"),
        ("pool_max_conn_lifetime", "1d", "unknown unit 'd' (use ns, us, ms, s, m or h)"),
        ("pool_max_conn_lifetime", "-1s", "must not be negative"),
        ("pool_max_conn_lifetime", "60", "missing unit"),
        ("pool_max_conn_idle_time", "forever", "expected a number followed by a unit"),
        ("pool_max_conn_idle_time", "-1m", "must not be negative"),
        ("pool_health_check_period", "0", "must be greater than 0"),
        ("pool_health_check_period", "0s", "must be greater than 0"),
        ("pool_health_check_period", "-5s", "must be greater than 0"),
        ("pool_health_check_period", "1y", "unknown unit 'y'"),
        ("pool_max_conn_lifetime_jitter", "-1ms", "must not be negative"),
        ("pool_max_conn_lifetime_jitter", "", "empty duration"),
    ],
)
@pytest.mark.parametrize("form", ["url", "dsn"])
def test_bad_pool_option(option: str, value: str, message: str, form: str) -> None:
    if form == "url":
        text = f"postgres://app:{SECRET}@db/app?{option}={value}"
    else:
        text = f"host=db password={SECRET} {option}='{value}'"
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string(text)
    assert str(info.value).startswith(f"invalid {option} {value!r}: ")
    assert message in str(info.value)
    assert SECRET not in str(info.value)


def test_min_conns_above_max_conns() -> None:
    with pytest.raises(
        ConnectionStringError,
        match=re.escape("invalid pool_min_conns '5': must not exceed pool_max_conns (4)"),
    ):
        parse_connection_string("host=db pool_max_conns=4 pool_min_conns=5")


# --- the password never leaks -------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"host=db password={SECRET} dbname", id="dsn-word-after-password"),
        pytest.param(f"host=db password=my {SECRET} dbname=app", id="dsn-unquoted-space"),
        pytest.param(f"host=db password=my host{SECRET}", id="dsn-keyword-like-fragment"),
        pytest.param(f"host=db password='{SECRET}", id="dsn-unterminated-quote"),
        pytest.param(f"host=db password='{SECRET}\\'", id="dsn-escaped-closing-quote"),
        pytest.param(f"host=db {SECRET}=x password={SECRET}", id="dsn-password-as-key"),
        pytest.param(f"{SECRET}", id="dsn-password-alone"),
        pytest.param(f"password={SECRET} port=abc", id="dsn-bad-port"),
        pytest.param(f"password={SECRET} pool_max_conns=x", id="dsn-bad-pool"),
        pytest.param(f"password={SECRET}\x00", id="dsn-nul"),
        pytest.param(f"postgres://u:{SECRET}@host:notaport/db", id="url-bad-port"),
        pytest.param(f"postgres://u:my/{SECRET}@host/db", id="url-slash-in-password"),
        pytest.param(f"postgres://u:{SECRET}%zz@host/db", id="url-bad-percent-in-password"),
        pytest.param(f"postgres://u:%{SECRET}@host/db", id="url-percent-before-password"),
        pytest.param(f"postgres://u:{SECRET}%00@host/db", id="url-nul-in-password"),
        pytest.param(f"postgres://u:{SECRET}@[::1/db", id="url-unclosed-bracket"),
        pytest.param(f"postgres://u:{SECRET}@[::1]x/db", id="url-junk-after-bracket"),
        pytest.param(f"postgres://u:{SECRET}@h/db?{SECRET}", id="url-password-as-query"),
        pytest.param(f"postgres://u:{SECRET}@h/db?{SECRET}=1", id="url-password-as-query-key"),
        pytest.param(f"postgres://u:{SECRET}@h/db?foo=1", id="url-unknown-param"),
        pytest.param(f"postgres://h/db?password={SECRET}%zz", id="url-query-password-percent"),
        pytest.param(f"postgres://h/db?password={SECRET}=x", id="url-query-password-equals"),
        pytest.param(f"postgres://u:{SECRET}@h/db?pool_min_conns=-1", id="url-bad-pool"),
        pytest.param(f"postgres://u:p@{SECRET}@host:notaport/db", id="url-at-sign-bad-port"),
        pytest.param(f"postgres://u:p@{SECRET}@h/db?foo=1", id="url-at-sign-unknown-param"),
        pytest.param(f"postgres://u:p@{SECRET}@[::1/db", id="url-at-sign-unclosed-bracket"),
        pytest.param(f"mysql://u:{SECRET}@h/db", id="unknown-scheme"),
        pytest.param(f"host=db sslpassword={SECRET} x", id="dsn-sslpassword"),
    ],
)
def test_password_never_in_errors(text: str) -> None:
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string(text)
    for exc in exception_chain(info.value):
        for rendered in (str(exc), repr(exc), *map(str, exc.args)):
            assert SECRET not in rendered
            assert "cr3t" not in rendered  # nor a fragment of it
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_libpq_message_naming_only_a_key_is_kept() -> None:
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string(f"host=db password={SECRET} colour=blue")
    assert str(info.value) == 'invalid connection option "colour"'


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"postgres://app:{SECRET}@db:5432/app", id="url"),
        pytest.param(f"host=db port=5432 user=app password={SECRET} dbname=app", id="dsn"),
        pytest.param(f"postgres://app:p@{SECRET}@db:5432/app", id="url-raw-at-sign"),
    ],
)
def test_password_not_in_repr_or_describe(text: str) -> None:
    settings = parse_connection_string(text)
    assert settings.password is not None
    assert settings.password.endswith(SECRET)
    assert SECRET in settings.conninfo  # libpq needs it
    assert settings.describe() == "user=app host=db port=5432 dbname=app"
    for rendered in (repr(settings), str(settings), settings.describe()):
        assert SECRET not in rendered


async def test_raw_at_sign_in_a_url_password_never_leaks_when_connecting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # libpq alone would read the password "p" and the host "s3cr3t@127.0.0.1",
    # and its "could not translate host name" error would quote the rest.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    text = f"postgresql://app:p@{SECRET}@127.0.0.1:{port}/app?connect_timeout=2"
    with caplog.at_level(logging.DEBUG), pytest.raises(DatabaseError) as info:
        with anyio.fail_after(20):
            async with open_backend(text):
                pytest.fail("the body must not run")
    assert f"port {port}" in str(info.value)  # the right host was tried
    for exc in exception_chain(info.value):
        for rendered in (str(exc), repr(exc), *map(str, exc.args)):
            assert "cr3t" not in rendered
    assert all("cr3t" not in record.getMessage() for record in caplog.records)


# --- ConnectionSettings -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("postgres://db/app", "host=db dbname=app", id="no-user"),
        pytest.param(
            "postgres://u@h1:1,h2:2/app", "user=u host=h1,h2 port=1,2 dbname=app", id="multi-host"
        ),
        pytest.param("host='/tmp/my socket'", "host='/tmp/my socket'", id="quoted"),
        pytest.param("application_name=x", "(libpq defaults)", id="nothing-to-show"),
    ],
)
def test_describe(text: str, expected: str) -> None:
    assert parse_connection_string(text).describe() == expected


@pytest.mark.parametrize(
    ("password", "text"),
    [
        pytest.param("s3cr3t", "auth failed for s3cr3t!", id="raw"),
        pytest.param("p@ss word", "url postgres://u:p%40ss%20word@h", id="percent-encoded"),
        pytest.param("p@ss word", "url postgres://u:p%40ss word@h", id="partly-encoded"),
        pytest.param("p@ss/x", "url postgres://u:p%40ss%2fx@h", id="lower-case-hex"),
        pytest.param("it's\\", "conninfo password='it\\'s\\\\'", id="libpq-escaped"),
        pytest.param("\u20ac1", "url postgres://u:%E2%82%AC1@h", id="utf8-encoded"),
    ],
)
def test_redact(password: str, text: str) -> None:
    settings = parse_connection_string("host=db").with_params(password=password)
    redacted = settings.redact(text)
    assert "********" in redacted
    assert password not in redacted
    assert "%40ss" not in redacted
    assert "%E2%82%AC" not in redacted


def test_redact_conninfo_and_repeated() -> None:
    settings = parse_connection_string(f"postgres://u:{SECRET}@db/app")
    assert SECRET not in settings.redact(settings.conninfo)
    assert settings.redact(f"{SECRET} and {SECRET}") == "******** and ********"


@pytest.mark.parametrize(
    "text",
    [pytest.param("host=db", id="no-password"), pytest.param("host=db password=''", id="empty")],
)
def test_redact_without_password_is_identity(text: str) -> None:
    settings = parse_connection_string(text)
    assert settings.redact("nothing to hide: '' ") == "nothing to hide: '' "


def test_redact_short_password_does_not_recurse() -> None:
    settings = parse_connection_string("host=db password=*")
    assert settings.redact("a*b") == "a********b"


def test_dbname() -> None:
    assert parse_connection_string("postgres://db/app").dbname == "app"
    assert parse_connection_string("host=db").dbname is None


def test_with_dbname() -> None:
    settings = parse_connection_string(f"postgres://app:{SECRET}@db:5432/app?pool_max_conns=3")
    maintenance = settings.with_dbname("postgres")
    assert maintenance.dbname == "postgres"
    assert maintenance.password == SECRET
    assert maintenance.pool == settings.pool
    assert params_of(maintenance) == {**params_of(settings), "dbname": "postgres"}
    assert settings.dbname == "app"  # unchanged


def test_with_dbname_quotes_odd_names() -> None:
    settings = parse_connection_string("host=db").with_dbname("my 'db'")
    assert settings.dbname == "my 'db'"


def test_with_params() -> None:
    settings = parse_connection_string(f"host=db password={SECRET} application_name=a")
    changed = settings.with_params(application_name="b", connect_timeout="5")
    assert params_of(changed) == {
        "host": "db",
        "password": SECRET,
        "application_name": "b",
        "connect_timeout": "5",
    }
    assert changed.pool == settings.pool
    assert params_of(settings)["application_name"] == "a"  # unchanged


def test_with_params_replacing_the_password() -> None:
    settings = parse_connection_string(f"host=db password={SECRET}")
    changed = settings.with_params(password="other")
    assert changed.password == "other"
    assert changed.redact("other") == "********"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        pytest.param({"colour": "blue"}, 'invalid connection option "colour"', id="unknown"),
        pytest.param({"pool_max_conns": "3"}, 'invalid connection option "pool_max_conns"', id="p"),
        pytest.param({"port": "abc"}, "invalid port 'abc'", id="port"),
        pytest.param({"host": "a\x00b"}, "'host' contains a NUL character", id="nul"),
    ],
)
def test_with_params_invalid(params: dict[str, str], message: str) -> None:
    settings = parse_connection_string(f"host=db password={SECRET}")
    with pytest.raises(ConnectionStringError, match=re.escape(message)) as info:
        settings.with_params(**params)
    assert SECRET not in str(info.value)


def test_settings_are_frozen_and_comparable() -> None:
    first = parse_connection_string("postgres://db/app")
    assert first == parse_connection_string("postgres://db/app")
    assert hash(first) == hash(parse_connection_string("postgres://db/app"))
    with pytest.raises(AttributeError):
        first.conninfo = "host=other"  # type: ignore[misc]


def test_pool_option_names() -> None:
    assert set(POOL_OPTION_NAMES) == {
        "pool_max_conns",
        "pool_min_conns",
        "pool_max_conn_lifetime",
        "pool_max_conn_idle_time",
        "pool_health_check_period",
        "pool_max_conn_lifetime_jitter",
    }


# --- PoolOptions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"max_conns": 0}, "max_conns must be an integer greater than 0", id="max0"),
        pytest.param({"max_conns": True}, "max_conns must be an integer", id="max-bool"),
        pytest.param({"max_conns": 2, "min_conns": 3}, "min_conns must be an integer", id="min"),
        pytest.param({"min_conns": -1}, "min_conns must be an integer", id="min-negative"),
        pytest.param({"max_conn_lifetime": -1.0}, "max_conn_lifetime must be", id="lifetime"),
        pytest.param({"max_conn_idle_time": float("nan")}, "max_conn_idle_time", id="idle-nan"),
        pytest.param({"max_conn_lifetime_jitter": float("inf")}, "jitter", id="jitter-inf"),
        pytest.param({"health_check_period": 0.0}, "health_check_period must be", id="health"),
    ],
)
def test_pool_options_validate(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        PoolOptions(**kwargs)  # type: ignore[arg-type]


def test_pool_options_error_names_the_field_and_what_is_wrong() -> None:
    with pytest.raises(PoolOptionsError) as info:
        PoolOptions(max_conns=4, min_conns=5)
    assert isinstance(info.value, ConfigurationError)
    assert str(info.value) == "min_conns must be an integer from 0 to max_conns (4), got 5"
    assert info.value.option == "min_conns"
    assert info.value.reason() == "must not exceed max_conns (4)"
    assert info.value.reason(prefix="pool_") == "must not exceed pool_max_conns (4)"


def test_pool_range_error_in_a_connection_string_chains_nothing() -> None:
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string(f"password={SECRET} pool_max_conn_lifetime=-1s")
    assert str(info.value) == "invalid pool_max_conn_lifetime '-1s': must not be negative"
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
