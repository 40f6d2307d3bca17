"""Periodic jobs with start_cron, on asyncio (in memory unless NEOQ_DSN is set).

    python examples/periodic.py

Runs an every-second cron for three ticks. With several processes on one
PostgreSQL database, each tick would still run exactly once.
"""

from __future__ import annotations

import os

import anyio

from neoq_anyio import Handler, Job, open_backend


async def main() -> None:
    ticks: list[str] = []
    three = anyio.Event()

    async def heartbeat(job: Job) -> None:
        assert job.payload is not None
        ticks.append(job.payload["tick"])
        print("tick", job.payload["tick"], "on queue", job.queue)
        if len(ticks) == 3:
            three.set()

    async with open_backend(os.environ.get("NEOQ_DSN", "memory://")) as nq:
        handler = await nq.start_cron("* * * * * *", Handler("", heartbeat))
        print("queue derived from the schedule:", handler.queue)
        with anyio.fail_after(10):
            await three.wait()


if __name__ == "__main__":
    anyio.run(main)
