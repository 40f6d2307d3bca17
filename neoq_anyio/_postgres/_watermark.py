"""Where a queue's next claim starts: a keyset "watermark" per queue.

Claims take the ready jobs in claim order (``(-priority, run_after, id)``:
higher priority first, then oldest) from ``neoq_anyio_jobs_ready_idx``.
Every job completed leaves its old row version's entry at the head of that
index until vacuum removes it, and vacuum
cannot while any transaction in the database is older than the completion
(a long job, a report, an idle psql session). A claim scanning from the head
walks all of them, so draining a backlog slows down as it goes: Que's
"failure by MVCC". Claims here start after the last job this process
claimed on the queue instead, so the entries they walk do not grow with the
backlog.

Jobs can turn up behind the watermark: a job of a higher priority, an INSERT
that committed after a later job was claimed, a job given an old
``run_after``, a claim elsewhere that rolled back. Every claim first takes
jobs of a higher priority than the watermark's (a short scan: the index
orders by priority first); one that finds too few jobs ahead looks behind it too,
and the position is forgotten on every sweep (start, reconnection, the
pending-job poller), so such a job waits at most until the queue ahead of it
is drained or the next sweep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._sql import Position

__all__ = ["Watermark"]


class Watermark:
    """The position after which a queue's claims in this process start."""

    __slots__ = ("position",)

    def __init__(self) -> None:
        self.position: Position | None = None

    def advance(self, position: Position) -> None:
        """A job at ``position`` was claimed (claims take only jobs with a
        ``run_after``, so it is always ordered)."""
        if self.position is None or position > self.position:
            self.position = position

    def reset(self) -> None:
        """Start again from the head of the queue."""
        self.position = None
