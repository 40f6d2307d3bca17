"""Paused queues, as one process knows them, kept in step with the database.

``pause_queue`` writes the queue's row of ``neoq_anyio_queues`` and, in the
same statement, announces the change on the channel ``neoq_anyio_queues_v1``.
Every process holds the set of paused queues and applies it to its queues'
``Wakeups``: the idle workers of a paused queue take nothing until it is
resumed. The process that pauses applies the change before ``pause_queue``
returns; the others re-read the set

* at once when the announcement arrives (the listener pokes ``refresh``),
  and after the listener reconnects, since announcements may have been
  missed meanwhile;
* every ``job_check_interval`` regardless: one query per process, however
  many queues it runs. This is what bounds a missed announcement, and all a
  process that listens to nothing (behind a transaction pooler without
  ``listen_connection_string``) has.

A read under way when the set changes (a local pause, an announcement) may
have started before the change was committed: its result is dropped and the
set read again, so a late answer never resumes a queue just paused.

A claim that was already under way when the pause arrived still takes its
jobs: that, and the announcement's trip, is the "within a second or two".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import anyio

from neoq_anyio._exceptions import DatabaseError, PoolTimeoutError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anyio.abc import TaskStatus

    from neoq_anyio._log import BackendLog

    from ._admin import JobAdmin
    from ._wakeups import Wakeups

__all__ = ["PausedQueues"]


class PausedQueues:
    """The paused queues, read from the database and applied to the queues here.

    Args:
        admin: reads and writes the paused queues.
        queues: the wake-ups of the queues this process runs, by name.
        interval: seconds between reads (``job_check_interval``).
        log: the backend's log.
    """

    def __init__(
        self,
        admin: JobAdmin,
        queues: Mapping[str, Wakeups],
        *,
        interval: float,
        log: BackendLog,
    ) -> None:
        self._admin = admin
        self._queues = queues
        self._interval = interval
        self._log = log
        self._paused: frozenset[str] = frozenset()
        self._changes = 0  # local changes and announcements: a read that spans one is stale
        self._wake = anyio.Event()
        self.reads = 0  # reads applied (for tests)

    @property
    def paused(self) -> frozenset[str]:
        """The queues paused, as last read or changed here."""
        return self._paused

    async def set(self, queue: str, *, paused: bool) -> None:
        """Pause or resume ``queue`` in the database (announced to every
        listening process), then here."""
        await self._admin.set_paused(queue, paused)
        self._changes += 1
        self._paused = self._paused | {queue} if paused else self._paused - {queue}
        self._apply()

    def refresh(self) -> None:
        """The paused queues changed somewhere (an announcement, a
        reconnection): read them again now."""
        self._changes += 1
        self._wake.set()

    def attach(self, queue: str) -> None:
        """A queue was just started here: pause it if it is paused."""
        self._apply_to(queue)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> NoReturn:
        """Read the paused queues, then keep them read until cancelled.

        Raises:
            DatabaseError, PoolTimeoutError: the first read failed (so does
                the ``start`` that starts this); later failures are logged,
                and the last set read stays in force.
        """
        await self._read()
        task_status.started()
        while True:
            with anyio.move_on_after(self._interval):
                await self._wake.wait()
            try:
                await self._read()
            except (DatabaseError, PoolTimeoutError) as exc:
                self._log.warning("cannot read the paused queues, keeping the last read: %s", exc)

    async def _read(self) -> None:
        while True:
            self._wake = anyio.Event()  # a change from now on asks for another read
            changes = self._changes
            paused = await self._admin.paused_queues()
            if changes == self._changes:  # nothing changed while it was read
                break
        self._paused = paused
        self.reads += 1
        self._apply()

    def _apply(self) -> None:
        for queue in self._queues:
            self._apply_to(queue)

    def _apply_to(self, queue: str) -> None:
        wakeups = self._queues.get(queue)
        if wakeups is None:
            return
        paused = queue in self._paused
        if paused == wakeups.paused:
            return
        if paused:
            wakeups.pause()
            self._log.info("queue %s paused: taking no jobs until it is resumed", queue)
        else:
            wakeups.resume()
            self._log.info("queue %s resumed", queue)
