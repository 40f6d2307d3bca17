"""A real ``neoq-anyio dashboard`` subprocess, for the dashboard's tests.

It listens on a free port (``--port 0``); the port is read from Hypercorn's
"Running on" line on stderr, which is read as it comes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import Process

__all__ = ["Dashboard", "dashboard"]

_RUNNING = re.compile(r"Running on (http://\S+)")


class Dashboard:
    """A running dashboard: its URL, its stderr so far, and how it ended."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.stderr = ""
        self._grew = anyio.Event()

    async def read(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk.decode(errors="replace")
            self._grew.set()
            self._grew = anyio.Event()

    async def wait_for_url(self, timeout: float = 30) -> str:
        """The base URL, once the server listens (bounded)."""
        with anyio.fail_after(timeout):
            while (found := _RUNNING.search(self.stderr)) is None:
                if self.process.returncode is not None:
                    raise AssertionError(f"the dashboard exited:\n{self.stderr}")
                await self._grew.wait()
        return found[1]

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def exit_status(self, timeout: float = 20) -> int:
        with anyio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def dashboard(dsn: str, *args: str, loop: str = "asyncio") -> AsyncIterator[Dashboard]:
    """Run ``neoq-anyio dashboard`` for the block; killed if still running at the end."""
    command = [sys.executable, "-m", "neoq_anyio", "dashboard", "--port", "0", "--loop", loop]
    env = {**os.environ, "NEOQ_DSN": dsn, "PYTHONUNBUFFERED": "1"}
    env.pop("NEOQ_DASHBOARD_TOKEN", None)
    process = await anyio.open_process(
        [*command, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    running = Dashboard(process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(running.read)
            yield running
            if process.returncode is None:
                running.signal(signal.SIGTERM)
            await running.exit_status()
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.move_on_after(5, shield=True):
                await process.wait()
