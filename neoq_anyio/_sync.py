"""Waiting in line: the FIFO wake-up both backends' idle workers use."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable

__all__ = ["event_factory", "wait_in_line"]


def event_factory() -> Callable[[], anyio.Event]:
    """A maker of ``anyio.Event``s for the running event loop.

    ``anyio.Event()`` looks up the running loop's backend on every call,
    which costs more than the rest of handing a no-op job to a worker. The
    backend's own class, looked up once, makes the same events.
    """
    return type(anyio.Event())


async def wait_in_line(line: deque[anyio.Event], timeout: float = math.inf) -> None:
    """Queue an event on ``line`` and wait until someone sets it (or ``timeout``
    seconds pass); a waiter that leaves unwoken takes its event out of line."""
    event = anyio.Event()
    line.append(event)
    try:
        with anyio.move_on_after(timeout):
            await event.wait()
    finally:
        if not event.is_set():
            line.remove(event)
