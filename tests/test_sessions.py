"""What a process holds on the server: named sessions, and nothing to spare
for a process that only enqueues."""

from __future__ import annotations

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from neoq_anyio import Handler, Job, open_backend

from .conftest import Database


async def _sessions(db: Database, application_name: str) -> list[str]:
    rows = await db.fetch(
        "SELECT query FROM pg_stat_activity WHERE application_name = %s AND pid <> "
        "pg_backend_pid() ORDER BY pid",
        (application_name,),
    )
    return [row[0] for row in rows]


async def test_a_producer_holds_no_listen_connection_until_start(
    dsn: str, db: Database, schema_name: str
) -> None:
    # Without retention: its pruning pass would take a pooled connection too.
    async with open_backend(dsn, keep_processed=None, keep_dead=None) as nq:
        await nq.enqueue(Job("mail", {}))
        sessions = await _sessions(db, schema_name)
        assert len(sessions) == 1  # the one pooled connection enqueue used
        assert not any(query.upper().startswith("LISTEN") for query in sessions)
        assert nq.statistics().pool is not None
        assert nq.statistics().pool.size == 1

        await nq.start(Handler("mail", _noop, concurrency=2))
        sessions = await _sessions(db, schema_name)
        assert any(query.upper().startswith("LISTEN") for query in sessions)


async def test_sessions_are_named_neoq_anyio_unless_the_dsn_says(dsn: str, db: Database) -> None:
    params = conninfo_to_dict(dsn)
    params.pop("application_name")
    async with open_backend(make_conninfo(**params)) as nq:
        await nq.enqueue(Job("mail", {}))
        assert (
            await db.value(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'neoq_anyio' "
                "AND query LIKE '%%neoq_jobs%%'"
            )
            >= 1
        )


async def _noop(job: Job) -> None:
    pass
