"""Background look-ups that find jobs no notification announced.

* ``FutureJobs``: every ``job_check_interval`` it lists jobs coming due
  within ``future_job_window`` (retries included) and wakes their queue's
  workers when each comes due; jobs enqueued by this process are added
  directly. Times are measured on the database's clock.
* ``PendingJobs``: every ``pending_job_check_interval``, and when poked
  (start, reconnection), it asks each queue whether a due job waits, and if
  so sweeps the queue; this is how jobs queued while nobody listened, or
  whose notification was lost, get run. Behind a transaction pooler without
  a LISTEN connection no notification arrives at all: the backend then runs
  it every ``job_check_interval``, and it is how workers learn of jobs
  enqueued by other processes.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, NoReturn

import anyio

from neoq_anyio._exceptions import DatabaseError, PoolTimeoutError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anyio.abc import TaskStatus

    from neoq_anyio._log import BackendLog

    from ._store import JobStore
    from ._wakeups import Wakeups

__all__ = ["FutureJobs", "PendingJobs"]

_DB_ERRORS = (DatabaseError, PoolTimeoutError)


_RETRY_AFTER_ERROR = 1.0  # seconds before a failed look-up is tried again


class _Poke:
    """A re-armable wake-up for a background loop."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    @property
    def pending(self) -> bool:
        """Set, and not yet waited for."""
        return self._event.is_set()

    async def wait(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self._event.wait()
        if self._event.is_set():
            self._event = anyio.Event()


class FutureJobs:
    """Wakes queues when their future jobs come due."""

    def __init__(
        self,
        store: JobStore,
        queues: Mapping[str, Wakeups],
        *,
        window: float,
        interval: float,
        log: BackendLog,
    ) -> None:
        self._store = store
        self._queues = queues
        self._window = window
        self._interval = interval
        self._log = log
        self._heap: list[tuple[float, str, str]] = []  # (due on anyio's clock, id, queue)
        self._known: set[str] = set()
        self._poke = _Poke()
        self._scan_now = False

    def add(self, job_id: str, queue: str, delay: float) -> None:
        """Schedule a wake-up for a job due in ``delay`` seconds, if within the window."""
        if delay > self._window or job_id in self._known:
            return
        self._known.add(job_id)
        heapq.heappush(self._heap, (anyio.current_time() + delay, job_id, queue))
        self._poke.set()

    def rescan(self) -> None:
        """Look for future jobs now (a queue was added)."""
        self._scan_now = True
        self._poke.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        next_scan = anyio.current_time()
        while True:
            now = anyio.current_time()
            if now >= next_scan or self._scan_now:
                self._scan_now = False
                ok = await self._scan()
                now = anyio.current_time()
                next_scan = now + (
                    self._interval if ok else max(self._interval, _RETRY_AFTER_ERROR)
                )
            while self._heap and self._heap[0][0] <= now:
                _, job_id, queue = heapq.heappop(self._heap)
                self._known.discard(job_id)
                wakeups = self._queues.get(queue)
                if wakeups is not None:
                    wakeups.hint()
            until = min(next_scan, self._heap[0][0]) if self._heap else next_scan
            await self._poke.wait(max(0.0, until - now))

    async def _scan(self) -> bool:
        queues = list(self._queues)
        if not queues:
            return True
        try:
            rows = await self._store.future_jobs(queues, self._window)
        except _DB_ERRORS as exc:
            self._log.warning("%s", exc)
            return False
        for job_id, queue, seconds in rows:
            self.add(job_id, queue, seconds)
        return True


class PendingJobs:
    """Sweeps queues that have due jobs nobody announced."""

    def __init__(
        self,
        store: JobStore,
        queues: Mapping[str, Wakeups],
        *,
        interval: float,
        log: BackendLog,
    ) -> None:
        self._store = store
        self._queues = queues
        self._interval = interval
        self._log = log
        self._poke = _Poke()
        self.checks = 0  # looks completed, with queues to look at (for tests)
        self._checking = False

    def poke(self) -> None:
        """Check every queue now."""
        self._poke.set()

    @property
    def settled(self) -> bool:
        """No look running, and none asked for (for tests)."""
        return not (self._checking or self._poke.pending)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        while True:
            self._checking = True
            ok = await self._check()
            self._checking = False
            await self._poke.wait(self._interval if ok else min(self._interval, _RETRY_AFTER_ERROR))

    async def _check(self) -> bool:
        queues = list(self._queues)
        if not queues:
            return True
        try:
            due = await self._store.queues_with_due_jobs(queues)
        except _DB_ERRORS as exc:
            self._log.warning("%s", exc)
            return False
        for queue in due:
            wakeups = self._queues.get(queue)
            if wakeups is not None:
                wakeups.sweep()
        self.checks += 1
        return True
