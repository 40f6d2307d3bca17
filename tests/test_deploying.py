"""What docs/deploying.md promises operators: the grants it lists are enough."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest
from psycopg import sql

from neoq_anyio import DatabaseError, Handler, Job, open_backend

from .conftest import with_params

DEPLOYING = Path(__file__).resolve().parent.parent / "docs" / "deploying.md"


def grants_from_the_docs(schema: str, role: str) -> str:
    """The docs' GRANT block, for this test's schema and role."""
    text = DEPLOYING.read_text(encoding="utf-8")
    block = re.search(r"```sql\n(GRANT .*?)```", text, re.DOTALL)
    assert block is not None, "docs/deploying.md lost its GRANT block"
    grants = block[1].replace("SCHEMA public TO", f'SCHEMA "{schema}" TO')
    return re.sub(r"\bTO app;", f'TO "{role}";', grants)


@pytest.fixture
def role(server_dsn: str) -> Iterator[str]:
    name = f"neoq_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield name
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


async def test_the_documented_grants_are_enough(dsn: str, schema_name: str, role: str) -> None:
    async with open_backend(dsn):  # migrates, as `neoq-anyio migrate` would
        pass
    async with open_backend(dsn) as owner, owner.connection() as conn:
        await conn.execute(grants_from_the_docs(schema_name, role).encode())

    done = anyio.Event()
    seen: list[str] = []

    async def handle(job: Job) -> None:
        seen.append(job.payload["n"])
        if len(seen) == 2:
            done.set()

    as_app = with_params(dsn, user=role)
    async with open_backend(as_app, job_check_interval=0.1) as nq:
        await nq.start(Handler("granted", handle))
        await nq.enqueue(Job("granted", {"n": "plain"}))
        async with nq.connection() as conn:
            await nq.enqueue(Job("granted", {"n": "in a transaction"}), connection=conn)
        with anyio.fail_after(10):
            await done.wait()
        ticked = anyio.Event()

        async def tick(job: Job) -> None:
            ticked.set()

        await nq.start_cron("@every 1s", Handler("ticks", tick))  # claims cron ticks
        with anyio.fail_after(10):
            await ticked.wait()
        limited = anyio.Event()

        async def lease(job: Job) -> None:
            limited.set()

        # Lease mode with global limits: slots and rate windows.
        await nq.start(
            Handler(
                "limited",
                lease,
                execution="lease",
                global_concurrency=2,
                rate_limit=(10, 1),
            )
        )
        await nq.pause_queue("limited")
        await nq.resume_queue("limited")
        await nq.enqueue(Job("limited", {"n": "leased"}))
        with anyio.fail_after(10):
            await limited.wait()
    assert sorted(seen) == ["in a transaction", "plain"]


async def test_without_grants_the_role_is_refused(dsn: str, role: str) -> None:
    async with open_backend(dsn):
        pass
    with pytest.raises(DatabaseError, match="permission denied"):
        async with open_backend(with_params(dsn, user=role)) as nq:
            await nq.enqueue(Job("granted", {}))
