"""Helpers for testing your own job code, on either backend.

```python
import pytest

from neoq_anyio import Handler, Job, open_backend
from neoq_anyio.testing import drain, enqueued


async def send_welcome(job: Job) -> None: ...


@pytest.mark.anyio
async def test_welcome_mail_is_sent() -> None:
    async with open_backend() as nq:                      # in memory
        await nq.start(Handler("emails", send_welcome))
        await nq.enqueue(Job("emails", {"to": "ada@example.com"}))
        await drain(nq)                                   # every due job has run
        [job] = await enqueued(nq, "emails")
        assert job.status == "processed"
```

Time: the in-memory backend's clock follows AnyIO's, so under trio's
``MockClock(autojump_threshold=0)`` future jobs, retries and cron ticks come
due as soon as every task waits, with no real waiting. On asyncio (and on
trio without a mock clock), ``fast_forward(nq, seconds)`` moves the
in-memory backend's clock ahead. On PostgreSQL, ``fast_forward`` brings
future jobs and retries forward in the database instead (cron there follows
the real clock).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from ._durations import to_seconds
from ._memory import MemoryBackend
from ._models import Job
from ._pg._connection import connect
from ._postgres import _sql
from ._postgres._backend import PostgresBackend

if TYPE_CHECKING:
    from datetime import timedelta

    from ._protocol import Backend

__all__ = ["dead_jobs", "drain", "enqueued", "fast_forward"]

_POLL = 0.01  # seconds between looks at PostgreSQL while draining


async def drain(nq: Backend, *, timeout: float = 30.0) -> None:
    """Wait until no job is due on the queues ``nq`` has handlers for, and none runs.

    Jobs due later (future jobs, retries waiting out their backoff) do not
    count: use ``fast_forward`` to make them due. On PostgreSQL it polls the
    database every 10 ms.

    Args:
        nq: a backend from ``open_backend``, whose block is open.
        timeout: seconds to wait at most (30).

    Raises:
        TimeoutError: jobs were still due or running after ``timeout`` seconds.
        TypeError: ``nq`` is not a backend from ``open_backend``.
    """
    with anyio.fail_after(timeout):
        if isinstance(nq, MemoryBackend):
            while nq._has_due() or nq.statistics().jobs_in_flight:
                await nq._wait_progress()
            return
        pg = _postgres(nq)
        queues = list(pg.statistics().queues)
        while True:
            async with pg.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM neoq_jobs WHERE queue = ANY(%s) "
                    "AND status <> 'processed' AND run_after <= now()",
                    (queues,),
                )
                row = await cur.fetchone()
            if not (row and row[0]) and not pg.statistics().jobs_in_flight:
                return
            await anyio.sleep(_POLL)


async def enqueued(nq: Backend, queue: str | None = None) -> list[Job]:
    """Every job in the queue table (processed ones too), oldest first.

    Works after the backend shut down too, so tests can look at what was left.

    Args:
        nq: a backend from ``open_backend``.
        queue: only this queue's jobs (default: every queue).

    Returns:
        The jobs, with their read-only fields (``id``, ``status``,
        ``retries``, ``ran_at``, ``error``, ``created_at``) filled in.

    Raises:
        TypeError: ``nq`` is not a backend from ``open_backend``.
    """
    if isinstance(nq, MemoryBackend):
        return [j for j in nq._jobs.values() if queue is None or j.queue == queue]
    return await _select(_postgres(nq), "neoq_jobs", queue)


async def dead_jobs(nq: Backend, queue: str | None = None) -> list[Job]:
    """Jobs moved to the dead jobs (retries exhausted, or deadline passed), oldest first.

    Works after the backend shut down too.

    Args:
        nq: a backend from ``open_backend``.
        queue: only this queue's jobs (default: every queue).

    Returns:
        The dead jobs. ``retries`` and ``error`` are those of the last run,
        ``created_at`` is when the job died, and on PostgreSQL ``run_after``
        and ``ran_at`` are ``None`` (the table has no such columns).

    Raises:
        TypeError: ``nq`` is not a backend from ``open_backend``.
    """
    if isinstance(nq, MemoryBackend):
        return [j for j in nq._dead.values() if queue is None or j.queue == queue]
    return await _select(_postgres(nq), "neoq_dead_jobs", queue)


async def fast_forward(nq: Backend, seconds: float | timedelta) -> None:
    """Make time pass for the backend's jobs without waiting.

    In memory, the backend's clock moves ahead: future jobs, retries and
    cron ticks within ``seconds`` come due. On PostgreSQL, the ``run_after``
    of unprocessed future jobs moves back by ``seconds`` (the database's
    clock cannot move), and the schedulers look again; cron there follows
    the real clock.

    Args:
        nq: a backend from ``open_backend``, whose block is open.
        seconds: how much time passes, in seconds or as a ``timedelta``.

    Raises:
        ConfigurationError: ``seconds`` is negative.
        TypeError: ``nq`` is not a backend from ``open_backend``.
    """
    delta = to_seconds(seconds, name="seconds")
    if isinstance(nq, MemoryBackend):
        nq.clock.advance(delta)
        await anyio.lowlevel.checkpoint()
        return
    pg = _postgres(nq)
    async with pg.connection() as conn:
        await conn.execute(
            "UPDATE neoq_jobs SET run_after = run_after - make_interval(secs => %s) "
            "WHERE status <> 'processed' AND run_after > now()",
            (delta,),
        )
    pg._future.rescan()
    pg._pending.poke()


def _postgres(nq: Backend) -> PostgresBackend:
    if not isinstance(nq, PostgresBackend):
        raise TypeError(f"expected a backend from open_backend(), got {nq!r}")
    return nq


async def _select(nq: PostgresBackend, table: str, queue: str | None) -> list[Job]:
    columns = _sql.JOB_COLUMNS
    if table == "neoq_dead_jobs":
        # The dead jobs table has neither run_after nor ran_at.
        columns = columns.replace("run_after", "NULL AS run_after").replace(
            "ran_at", "NULL AS ran_at"
        )
    query = f"SELECT {columns} FROM {table}"
    if queue is not None:
        query += " WHERE queue = %s"
    query += " ORDER BY id"
    # A connection of its own, so jobs can be inspected after the block ended.
    conn = await connect(nq._settings.conninfo)
    try:
        cur = await conn.execute(query.encode(), (queue,) if queue is not None else None)
        rows = await cur.fetchall()
    finally:
        await conn.close()
    return [Job._from_row(**dict(zip(_sql.JOB_COLUMN_NAMES, row, strict=True))) for row in rows]
