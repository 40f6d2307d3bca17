"""Waiting in line: the FIFO wake-up both backends' idle workers use."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections import deque

__all__ = ["wait_in_line"]


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
