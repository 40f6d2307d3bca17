"""Database and schema setup: create what is missing, migrate once.

``schema.sql`` (shipped in the wheel) is idempotent, but running DDL on every
start would take locks on busy tables; so it runs only when
``neoq_anyio_migrations`` lacks ``SCHEMA_VERSION``, inside one transaction
holding an advisory lock. Processes starting together queue on the lock; the
first migrates, the others find the version row and do nothing.
"""

from __future__ import annotations

import importlib.resources
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Final

from psycopg import sql

from neoq_anyio._exceptions import DatabaseError
from neoq_anyio._pg._connection import connect
from neoq_anyio._pg._errors import map_errors

from . import _sql

if TYPE_CHECKING:
    from neoq_anyio._log import BackendLog
    from neoq_anyio._pg._connection import AnyioConnection
    from neoq_anyio._pg._dsn import ConnectionSettings

__all__ = [
    "SCHEMA_VERSION",
    "ensure_schema",
    "prepare_database",
    "schema_sql",
    "schema_to_create",
    "search_path_names",
]

SCHEMA_VERSION: Final = 5
"""Bump with every change to schema.sql, which must stay additive."""

# Any constant works; this one is "neoq" in ASCII, shared by every process.
_MIGRATION_LOCK: Final = 0x6E656F71

_DUPLICATE_DATABASE: Final = "42P04"


@cache
def schema_sql() -> str:
    """The text of schema.sql: from the installed wheel, or the source checkout."""
    packaged = importlib.resources.files("neoq_anyio").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "schema.sql").read_text(encoding="utf-8")


async def _migrated(conn: AnyioConnection) -> bool:
    cur = await conn.execute(_sql.MIGRATIONS_TABLE_EXISTS)
    row = await cur.fetchone()
    if not (row and row[0]):
        return False
    cur = await conn.execute(_sql.MIGRATED, (SCHEMA_VERSION,))
    return await cur.fetchone() is not None


_NAME_BYTES: Final = 63  # NAMEDATALEN - 1: PostgreSQL truncates longer identifiers
_SPACE: Final = frozenset(" \t\n\r\f\v")  # PostgreSQL's scanner_isspace
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_USER: Final = "$user"


def _truncated(name: str) -> str:
    """``name`` cut to 63 bytes on a character boundary, as PostgreSQL does."""
    encoded = name.encode()
    if len(encoded) <= _NAME_BYTES:
        return name
    return encoded[:_NAME_BYTES].decode(errors="ignore")


def search_path_names(setting: str) -> list[str]:
    """The schema names of a ``search_path`` setting, as PostgreSQL reads them.

    PostgreSQL's ``SplitIdentifierString``: names are separated by commas,
    with whitespace around them ignored; a double-quoted name keeps its case,
    spaces and commas, with ``""`` standing for one quote; an unquoted name
    is folded to lower case (ASCII letters only, as in a UTF-8 database).
    Both are truncated to 63 bytes. ``$user``, quoted or not, comes back as
    ``$user``: PostgreSQL reads either as the current role's schema.
    """
    names: list[str] = []
    pos, end = 0, len(setting)
    while True:
        while pos < end and setting[pos] in _SPACE:
            pos += 1
        if pos >= end:
            return names
        if setting[pos] == '"':
            parts: list[str] = []
            pos += 1
            while True:
                close = setting.find('"', pos)
                if close < 0:  # unbalanced: the server never accepts it
                    return names
                parts.append(setting[pos:close])
                pos = close + 1
                if setting[pos : pos + 1] != '"':
                    break
                parts.append('"')
                pos += 1
            name = "".join(parts)
        else:
            start = pos
            while pos < end and setting[pos] != "," and setting[pos] not in _SPACE:
                pos += 1
            name = setting[start:pos].translate(_ASCII_LOWER)
        names.append(_truncated(name))
        while pos < end and setting[pos] in _SPACE:
            pos += 1
        if pos >= end or setting[pos] != ",":
            return names
        pos += 1


def schema_to_create(names: list[str], *, current: str | None, user: str) -> str | None:
    """The schema to create so that neoq's tables land in the first one search_path names.

    PostgreSQL creates tables in the first schema of the search path that
    exists (``current``, ``None`` when none does); ``$user`` stands for the
    schema named after the current role (``user``) and is skipped while that
    schema does not exist, as are reserved ``pg_*`` names, which cannot be
    created. So the first name that is neither is created unless PostgreSQL
    already uses an entry before it; with nothing else listed, ``$user`` is
    created for the role. Once created, it is the schema PostgreSQL uses.

    Args:
        names: the search path, as ``search_path_names`` reads it.
        current: ``current_schema()``.
        user: ``current_user``.

    Returns:
        The schema to create, or ``None`` when there is nothing to create.
    """
    for name in names:
        if (user if name == _USER else name) == current:
            return None  # PostgreSQL already creates tables here
        if name and name != _USER and not name.startswith("pg_"):
            return name
    return user if _USER in names and current is None else None


async def _ensure_namespace(conn: AnyioConnection) -> None:
    """Create the first schema search_path names, when PostgreSQL would not use it otherwise.

    A missing first schema would leave neoq's tables in a later one (often
    ``public``), or nowhere; ``search_path_names`` reads the setting as
    PostgreSQL does, so the schema created is the one PostgreSQL then uses.
    """
    cur = await conn.execute(_sql.SEARCH_PATH)
    row = await cur.fetchone()
    assert row is not None
    current, setting, user = row
    name = schema_to_create(search_path_names(str(setting)), current=current, user=str(user))
    if name is not None:
        await conn.execute(_sql.CREATE_SCHEMA.format(sql.Identifier(name)))


async def _ensure_schema(conn: AnyioConnection, *, pooled: bool = False) -> bool:
    """Create neoq's tables in the connection's schema unless they are current.

    ``conn`` must be in autocommit mode. Returns True if this call migrated.
    ``pooled``: behind a transaction pooler, the session setup is made for
    the migration's transaction alone.

    psycopg's errors propagate; ``ensure_schema`` translates them.
    """
    if await _migrated(conn):
        return False
    async with conn.transaction():
        if pooled:
            await conn.execute(_sql.MIGRATION_SETUP)
        await conn.execute(_sql.MIGRATION_LOCK, (_MIGRATION_LOCK,))
        await _ensure_namespace(conn)
        if await _migrated(conn):
            return False
        await conn.execute(schema_sql().encode())
        await conn.execute(_sql.RECORD_MIGRATION, (SCHEMA_VERSION,))
    return True


async def ensure_schema(conn: AnyioConnection, log: BackendLog, *, pooled: bool = False) -> bool:
    """Create or upgrade neoq's tables on an autocommit connection; True if it migrated.

    ``pooled``: ``conn`` leads through a transaction pooler, so nothing is
    set on its session: the migration's transaction sets what it needs, and
    its advisory lock is a transaction's (``pg_advisory_xact_lock``), as it
    always is.

    Raises:
        DatabaseError: the DDL failed (for example, missing privileges); the
            transaction rolled back, so nothing is half-written.
    """
    with map_errors(log.redact, "cannot set up neoq's schema"):
        if not pooled:
            await conn.execute(_sql.SESSION_SETUP)
        return await _ensure_schema(conn, pooled=pooled)


async def prepare_database(
    settings: ConnectionSettings, log: BackendLog, *, pooled: bool = False
) -> None:
    """Connect once, creating the database and the schema when missing.

    ``pooled``: the connection string leads through a transaction pooler
    (see ``ensure_schema``).

    Raises:
        DatabaseError: the server cannot be reached, or the database cannot
            be created or migrated.
    """
    doing = f"cannot connect to {settings.describe()}"
    try:
        conn = await connect(settings.conninfo, redact=log.redact, doing=doing)
    except DatabaseError:
        if not await _create_database(settings, log):
            raise
        conn = await connect(settings.conninfo, redact=log.redact, doing=doing)
    try:
        await ensure_schema(conn, log, pooled=pooled)
    finally:
        await conn.close()


async def _create_database(settings: ConnectionSettings, log: BackendLog) -> bool:
    """Create the target database if it is missing; False if that is not the problem."""
    dbname = settings.dbname
    if not dbname or dbname == "postgres":
        return False
    try:
        conn = await connect(settings.with_dbname("postgres").conninfo, redact=log.redact)
    except DatabaseError:
        return False  # the server itself is unreachable: report the first error
    try:
        with map_errors(log.redact, f"cannot create database {dbname!r}"):
            cur = await conn.execute(_sql.DATABASE_EXISTS, (dbname,))
            if await cur.fetchone() is not None:
                return False
        try:
            with map_errors(log.redact, f"cannot create database {dbname!r}"):
                await conn.execute(_sql.CREATE_DATABASE.format(sql.Identifier(dbname)))
        except DatabaseError as exc:
            if exc.sqlstate != _DUPLICATE_DATABASE:
                raise
            # another process created it first
        return True
    finally:
        await conn.close()
