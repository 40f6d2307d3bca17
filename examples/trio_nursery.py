"""neoq_anyio inside a trio application's nursery, beside other tasks.

    python examples/trio_nursery.py          # in memory
    NEOQ_DSN=postgresql://... python examples/trio_nursery.py

The backend is one more resource scoped to the nursery: when the app's
scope ends, the backend's listener, schedulers and workers end with it.
"""

from __future__ import annotations

import os

import trio

from neoq_anyio import Handler, Job, open_backend


async def main() -> None:
    done = trio.Event()
    resized: list[str] = []

    async def resize(job: Job) -> None:
        assert job.payload is not None
        await trio.sleep(0.01)  # pretend to work
        resized.append(job.payload["image"])
        if len(resized) == 3:
            done.set()

    async def web_server(nq: object) -> None:
        await done.wait()  # stands in for the rest of your application

    dsn = os.environ.get("NEOQ_DSN", "memory://")
    async with open_backend(dsn) as nq, trio.open_nursery() as nursery:
        await nq.start(Handler("images", resize, concurrency=2))
        nursery.start_soon(web_server, nq)
        for name in ("a.png", "b.png", "c.png"):
            await nq.enqueue(Job("images", {"image": name}))
        with trio.fail_after(30):
            await done.wait()
    print("resized", sorted(resized))


if __name__ == "__main__":
    trio.run(main)
