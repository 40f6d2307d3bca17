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

__all__ = ["SCHEMA_VERSION", "ensure_schema", "prepare_database", "schema_sql"]

SCHEMA_VERSION: Final = 2
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


async def _ensure_namespace(conn: AnyioConnection) -> None:
    """Create the first schema of search_path when it does not exist yet."""
    cur = await conn.execute(_sql.SEARCH_PATH)
    row = await cur.fetchone()
    assert row is not None
    if not row[0]:
        return
    for name in (part.strip() for part in str(row[1]).split(",")):
        if name and name != '"$user"':
            await conn.execute(_sql.CREATE_SCHEMA.format(sql.Identifier(name.strip('"'))))
            return


async def _ensure_schema(conn: AnyioConnection) -> bool:
    """Create neoq's tables in the connection's schema unless they are current.

    ``conn`` must be in autocommit mode. Returns True if this call migrated.

    psycopg's errors propagate; ``ensure_schema`` translates them.
    """
    if await _migrated(conn):
        return False
    async with conn.transaction():
        await conn.execute(_sql.MIGRATION_LOCK, (_MIGRATION_LOCK,))
        await _ensure_namespace(conn)
        if await _migrated(conn):
            return False
        await conn.execute(schema_sql().encode())
        await conn.execute(_sql.RECORD_MIGRATION, (SCHEMA_VERSION,))
    return True


async def ensure_schema(conn: AnyioConnection, log: BackendLog) -> bool:
    """Create or upgrade neoq's tables on an autocommit connection; True if it migrated.

    Raises:
        DatabaseError: the DDL failed (for example, missing privileges); the
            transaction rolled back, so nothing is half-written.
    """
    with map_errors(log.redact, "cannot set up neoq's schema"):
        await conn.execute(_sql.SESSION_SETUP)
        return await _ensure_schema(conn)


async def prepare_database(settings: ConnectionSettings, log: BackendLog) -> None:
    """Connect once, creating the database and the schema when missing.

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
        await ensure_schema(conn, log)
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
