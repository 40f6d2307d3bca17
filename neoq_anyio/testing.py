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

from ._backend import Backend
from ._durations import to_seconds

if TYPE_CHECKING:
    from datetime import timedelta

    from ._models import Job

__all__ = ["dead_jobs", "drain", "enqueued", "fast_forward"]


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
        await _backend(nq)._wait_drained()


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
    return await _backend(nq)._stored_jobs(queue, dead=False)


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
    return await _backend(nq)._stored_jobs(queue, dead=True)


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
    await _backend(nq)._fast_forward(delta)


def _backend(nq: object) -> Backend:
    if not isinstance(nq, Backend):
        raise TypeError(f"expected a backend from open_backend(), got {nq!r}")
    return nq
