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

if TYPE_CHECKING:
    from neoq_anyio._pg._connection import AnyioConnection

__all__ = ["SCHEMA_VERSION", "ensure_schema", "schema_sql"]

SCHEMA_VERSION: Final = 2
"""Bump with every change to schema.sql, which must stay additive."""

# Any constant works; this one is "neoq" in ASCII, shared by every process.
_MIGRATION_LOCK: Final = 0x6E656F71


@cache
def schema_sql() -> str:
    """The text of schema.sql: from the installed wheel, or the source checkout."""
    packaged = importlib.resources.files("neoq_anyio").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "schema.sql").read_text(encoding="utf-8")


async def _migrated(conn: AnyioConnection) -> bool:
    cur = await conn.execute("SELECT to_regclass('neoq_anyio_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if not (row and row[0]):
        return False
    cur = await conn.execute(
        "SELECT 1 FROM neoq_anyio_migrations WHERE version = %s", (SCHEMA_VERSION,)
    )
    return await cur.fetchone() is not None


async def _ensure_namespace(conn: AnyioConnection) -> None:
    """Create the first schema of search_path when it does not exist yet."""
    cur = await conn.execute("SELECT current_schema() IS NULL, current_setting('search_path')")
    row = await cur.fetchone()
    assert row is not None
    if not row[0]:
        return
    for name in (part.strip() for part in str(row[1]).split(",")):
        if name and name != '"$user"':
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(name.strip('"')))
            )
            return


async def ensure_schema(conn: AnyioConnection) -> bool:
    """Create neoq's tables in the connection's schema unless they are current.

    ``conn`` must be in autocommit mode. Returns True if this call migrated.

    Raises:
        psycopg.Error: the DDL failed (for example, missing privileges); the
            transaction rolled back, so nothing is half-written.
    """
    if await _migrated(conn):
        return False
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await _ensure_namespace(conn)
        if await _migrated(conn):
            return False
        await conn.execute(schema_sql().encode())
        await conn.execute(
            "INSERT INTO neoq_anyio_migrations (version) VALUES (%s)", (SCHEMA_VERSION,)
        )
    return True
