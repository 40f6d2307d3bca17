"""Waking a queue's idle workers: the one synchronisation point between the
listener, the schedulers and the workers of a queue.

Two kinds of wake-up exist. A *hint* says "one job became due" (a
notification, a future job reaching its time): it wakes one worker, which
takes one job. A *sweep* says "an unknown number of jobs may be due" (start,
reconnection, the pending-job poller): it wakes every idle worker, and they
keep taking jobs until one finds none. So a single job costs one fetch, and
a backlog drains at full concurrency.

Every process sharing a database hears every notification, so hints
outnumber jobs there; a worker that finds nothing drops the hints that
predate its fetch (``mark``/``found_nothing``), which keeps the wasted
fetches to about one per process instead of one per job.

A paused queue (``pause_queue``, see ``_pauses``) keeps its hints and
sweeps but hands none out: ``wait`` returns only STOP until ``resume``,
which sweeps, since jobs enqueued meanwhile were announced to workers that
could not take them. Both worker kinds wait here between fetches, so
pausing needs little from their loops: the lease claimer looks at
``paused`` before each claim (it claims batch after batch without waiting
here while batches come back full), and so does its search for expired
leases.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import TYPE_CHECKING

from neoq_anyio._sync import wait_in_line

if TYPE_CHECKING:
    import anyio

__all__ = ["Wake", "Wakeups"]


class Wake(Enum):
    HINT = "hint"
    SWEEP = "sweep"
    STOP = "stop"


class Wakeups:
    """Hints and sweeps for one queue, and the idle workers waiting for them."""

    def __init__(self) -> None:
        self._hints = 0
        self._received = 0  # hints ever received, to tell stale ones apart
        self._sweeping = False
        self.sweeps = 0  # sweeps ever begun: claims forget their watermark at each
        self._stopped = False
        self._paused = False
        self._idle: deque[anyio.Event] = deque()
        self._resting: deque[anyio.Event] = deque()

    def hint(self) -> None:
        """One job became due: wake one idle worker."""
        self._hints += 1
        self._received += 1
        if self._idle:
            self._idle.popleft().set()

    def sweep(self) -> None:
        """Jobs may be due: every idle worker looks until the queue is empty."""
        self._sweeping = True
        self.sweeps += 1
        self._wake_all()

    def take_hint(self) -> bool:
        """Consume a pending hint without waiting; whether there was one."""
        if self._hints and not self._paused:
            self._hints -= 1
            return True
        return False

    def mark(self) -> int:
        """Taken before a fetch; pass it to ``found_nothing`` if the fetch is empty."""
        return self._received

    def found_nothing(self, mark: int) -> None:
        """A fetch started at ``mark`` found no due job: the sweep is over, and
        hints received before the fetch announced jobs that are taken."""
        self._sweeping = False
        self._hints = min(self._hints, self._received - mark)

    def retry(self) -> None:
        """A fetch failed (database unreachable): keep sweeping, without
        waking more workers, so the caller tries again."""
        self._sweeping = True

    def stop(self) -> None:
        """Shutdown: every worker returns STOP from now on."""
        self._stopped = True
        self._wake_all()
        while self._resting:
            self._resting.popleft().set()

    def pause(self) -> None:
        """The queue was paused: hand out no hint or sweep until ``resume``."""
        self._paused = True

    def resume(self) -> None:
        """The queue was resumed: every idle worker looks for the jobs that
        came due meanwhile. Nothing happens if it was not paused."""
        if self._paused:
            self._paused = False
            self.sweep()

    @property
    def paused(self) -> bool:
        """Whether the queue is paused: a worker takes no job until it is resumed."""
        return self._paused

    @property
    def stopped(self) -> bool:
        """Whether shutdown began: a worker takes no job from now on."""
        return self._stopped

    async def rest(self, seconds: float) -> None:
        """Sleep ``seconds`` (a worker after an error); only shutdown cuts it short."""
        if not self._stopped:
            await wait_in_line(self._resting, seconds)

    def _wake_all(self) -> None:
        while self._idle:
            self._idle.popleft().set()

    async def wait(self) -> Wake:
        """Wait for work; returns what woke this worker."""
        while True:
            if self._stopped:
                return Wake.STOP
            if not self._paused:
                if self._hints:
                    self._hints -= 1
                    return Wake.HINT
                if self._sweeping:
                    return Wake.SWEEP
            await wait_in_line(self._idle)
