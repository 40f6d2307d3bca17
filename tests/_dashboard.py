"""A real ``neoq-anyio dashboard`` subprocess, for the dashboard's tests.

It listens on a free port (``--port 0``); the port is read from Hypercorn's
"Running on" line on stderr, which is read as it comes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._processes import Running, running

__all__ = ["dashboard", "wait_for_url"]

_RUNNING = r"Running on (http://\S+)"


async def wait_for_url(dashboard: Running, timeout: float = 30) -> str:
    """The base URL, once the server listens (bounded)."""
    return (await dashboard.wait_for_log(_RUNNING, timeout))[1]


@asynccontextmanager
async def dashboard(dsn: str, *args: str, loop: str = "asyncio") -> AsyncIterator[Running]:
    """Run ``neoq-anyio dashboard`` for the block; killed if still running at the end."""
    command = [sys.executable, "-m", "neoq_anyio", "dashboard", "--port", "0", "--loop", loop]
    env = {**os.environ, "NEOQ_DSN": dsn, "PYTHONUNBUFFERED": "1"}
    env.pop("NEOQ_DASHBOARD_TOKEN", None)
    async with running([*command, *args], env=env) as child:
        yield child
