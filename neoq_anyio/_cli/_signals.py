"""The two-signal stop that ``worker`` and ``dashboard`` share.

The first SIGTERM or SIGINT asks for a graceful stop, a second one for an
immediate one, as operators of Celery, River and Oban expect. Signals are
read through AnyIO's signal receiver, on asyncio and trio alike, by a task
in the command's task group.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskStatus

__all__ = ["watch_signals"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def watch_signals(
    first: Callable[[str], None],
    again: Callable[[str], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``first(name)`` on the first signal and ``again(name)`` on each later
    one; ready (``task_status.started()``) once the signal handlers are in place."""
    with anyio.open_signal_receiver(*_SIGNALS) as signals:
        task_status.started()
        seen = False
        async for signum in signals:
            name = signal.Signals(signum).name
            (again if seen else first)(name)
            seen = True
