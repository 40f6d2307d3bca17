"""Real child processes for the command-line tests, with stderr read as it comes."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from anyio.abc import Process

__all__ = ["Running", "running"]


class Running:
    """A running command: its process, and its stderr so far."""

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

    async def wait_for_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """The first match of ``pattern`` (a regular expression) on stderr, once
        it is there (bounded); fails early if the process exits first."""
        with anyio.fail_after(timeout):
            while (found := re.search(pattern, self.stderr)) is None:
                if self.process.returncode is not None:
                    raise AssertionError(f"the process exited:\n{self.stderr}")
                await self._grew.wait()
        return found

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def exit_status(self, timeout: float = 20) -> int:
        with anyio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def running(
    command: Sequence[str], *, env: Mapping[str, str], cwd: Path | None = None
) -> AsyncIterator[Running]:
    """Run ``command`` for the block, then SIGTERM it and wait for it to end;
    killed if still running when the block fails."""
    process = await anyio.open_process(
        list(command), cwd=cwd, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    child = Running(process)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(child.read)
            yield child
            if process.returncode is None:
                child.signal(signal.SIGTERM)
            await child.exit_status()
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.move_on_after(5, shield=True):
                await process.wait()
