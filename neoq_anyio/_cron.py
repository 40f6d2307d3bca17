"""Periodic jobs: a ticker task per cron schedule, each tick enqueued once.

How a tick runs exactly once, whatever the number of processes:

Every process running the same cron computes the same tick instants from the
schedule (never from its own clock, so clocks that differ by a second agree
on which tick is which). At each tick, each process tries to *claim* it by
inserting ``(queue, tick)`` into ``neoq_anyio_cron_ticks``, whose primary
key admits one row per tick; the job is inserted in the same statement, only
by the process whose claim succeeded. A process that reaches the tick late,
even after the job already ran and left the unprocessed-job index (where Go
neoq's empty-payload deduplication would let it enqueue a second job), finds
the claim taken and enqueues nothing. Claims older than a day are pruned as
new ones are made.

Ticks missed while every process was down are not replayed: a ticker starts
from the first tick after it starts. A ticker that falls behind (a busy loop,
a suspended process) catches up on ticks at most ``_CATCH_UP`` seconds old
and skips older ones.

A tick whose enqueue fails (database briefly down) is logged and skipped;
the ticker goes on with the next one.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final, NoReturn

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import TaskStatus

    from ._cron_schedule import CronSchedule
    from ._log import BackendLog

__all__ = ["CronTicker", "WallClock", "tick_job_fields"]

_CATCH_UP: Final = 5.0


def tick_job_fields(queue: str, tick: datetime) -> tuple[str, str]:
    """``(fingerprint, payload JSON)`` of the job for one tick: the payload says
    which tick it is (``{"tick": "2026-01-01T00:00:00+00:00"}``). Ticks are
    claimed with ``neoq_anyio._postgres._sql.CLAIM_TICK``."""
    stamp = tick.astimezone(UTC).isoformat()
    fingerprint = hashlib.md5(f"{queue}@{stamp}".encode(), usedforsecurity=False).hexdigest()
    return fingerprint, json.dumps({"tick": stamp})


class WallClock:
    """The ticker's clock: UTC wall time, and AnyIO's sleep. Tests substitute
    one whose time runs faster, or follows trio's MockClock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class CronTicker:
    """Enqueues one job per tick of ``schedule`` on ``queue``.

    Args:
        schedule: the parsed spec.
        queue: the handler's queue.
        enqueue_tick: claims a tick and enqueues its job; returns whether
            this process's claim won.
        log: the backend's log.
        clock: where time comes from (injectable, for fake-clock tests).
    """

    def __init__(
        self,
        schedule: CronSchedule,
        queue: str,
        enqueue_tick: Callable[[str, datetime], Awaitable[bool]],
        *,
        log: BackendLog,
        clock: WallClock | None = None,
    ) -> None:
        self.schedule = schedule
        self.queue = queue
        self._enqueue_tick = enqueue_tick
        self._log = log
        self._clock = clock or WallClock()
        self.claimed = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        clock = self._clock
        after = clock.now()
        while True:
            tick = self.schedule.next_after(after)
            # Sleep in steps until the wall clock reaches the tick: anyio's
            # clock and the wall clock may drift apart over a long sleep.
            while (delay := (tick - clock.now()).total_seconds()) > 0:
                await clock.sleep(delay)
            try:
                if await self._enqueue_tick(self.queue, tick):
                    self.claimed += 1
            except Exception as exc:
                self._log.error(
                    "cron %r: could not enqueue the tick at %s: %s",
                    self.schedule.spec,
                    tick.isoformat(),
                    exc,
                )
            after = max(tick, clock.now() - timedelta(seconds=_CATCH_UP))
