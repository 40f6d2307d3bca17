"""Quickstart: enqueue jobs and process them, on asyncio or trio.

    python examples/quickstart.py            # asyncio, embedded PostgreSQL
    python examples/quickstart.py --trio     # the same code on trio
    NEOQ_DSN=postgresql://user:pass@host/db python examples/quickstart.py

Without NEOQ_DSN it starts a throwaway PostgreSQL (the ``embedded`` extra).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anyio

from neoq_anyio import Handler, Job, current_job, open_backend


async def send_welcome(job: Job) -> None:
    assert job.payload is not None
    print(f"  job {job.id}: welcome mail to {job.payload['to']}")


async def main(dsn: str) -> None:
    done = anyio.Event()
    reminders: list[str] = []

    async def send_reminder(job: Job) -> None:
        late = datetime.now(UTC) - (job.run_after or datetime.now(UTC))
        print(f"  job {current_job().id}: reminder, {late.total_seconds() * 1000:.0f} ms after due")
        reminders.append(job.id or "")
        done.set()

    async with open_backend(dsn) as nq:
        await nq.start(Handler("emails", send_welcome, concurrency=8))
        await nq.start(Handler("reminders", send_reminder))
        for who in ("ada@example.com", "grace@example.com", "alan@example.com"):
            await nq.enqueue(Job("emails", {"to": who}))
        due = datetime.now(UTC) + timedelta(seconds=1)
        await nq.enqueue(Job("reminders", {"to": "ada@example.com"}, run_after=due))
        print("enqueued 3 welcome mails and 1 reminder due in 1 s")
        with anyio.fail_after(30):
            await done.wait()
    print("done: the backend shut down with the block")


@contextlib.contextmanager
def database() -> Iterator[str]:
    if dsn := os.environ.get("NEOQ_DSN"):
        yield dsn
        return
    from neoq_anyio.embedded import embedded_postgres

    print("starting an embedded PostgreSQL (set NEOQ_DSN to use your own)")
    with embedded_postgres() as dsn:
        yield dsn


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    loop = "trio" if "--trio" in sys.argv else "asyncio"
    with database() as dsn:
        anyio.run(main, dsn, backend=loop)
