"""The one seam metrics and tracing plug into: an ``Observer`` told of
enqueues, job starts and job outcomes.

Both backends call the same hooks at the same points: ``Backend.enqueue``
wraps every enqueue, each worker calls ``job_started`` just before a handler
runs, and ``_execution.report`` (which every execution path calls with a
run's outcome) calls ``job_finished``. A worker cancelled mid-job (shutdown)
calls ``job_abandoned`` instead. With nothing observing, a backend's observer
is ``None`` and the hot paths skip every hook: one ``is None`` test each.

Every hook is called in the task that runs the enqueue or the job, so an
observer may make a context current in ``*_started`` (tracing makes the job's
span the current one, so spans the handler opens are its children) and
restore it in the matching ``*_finished`` or ``job_abandoned``; hooks of one
job come in order, one of ``job_finished`` / ``job_abandoned`` always last.

Observers must not raise: a hook's failure would fail the enqueue or lose
the job's outcome. The concrete ones (``_metrics``, ``_tracing``) import
their optional packages only when built, so ``import neoq_anyio`` needs
neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anyio.abc import TaskStatus

    from ._models import Job
    from ._outcome import Outcome

__all__ = ["Observer", "combine"]


class Observer:
    """Hooks called by a backend; each does nothing here."""

    __slots__ = ()

    def enqueue_started(self, job: Job) -> tuple[Job, Any]:
        """An enqueue of ``job`` begins. Returns the job to store (the same,
        or one carrying more, such as a trace context) and a state handed back
        to ``enqueue_finished``."""
        return job, None

    def enqueue_finished(
        self, state: Any, job: Job, job_id: str | None, exc: BaseException | None
    ) -> None:
        """The enqueue ended: stored as ``job_id``, or failed with ``exc``."""

    def tick_enqueued(self, queue: str) -> None:
        """A cron tick's job was enqueued on ``queue`` (by this process's claim)."""

    def job_started(self, job: Job) -> Any:
        """``job`` (as its handler sees it) is about to run; returns a state
        handed back to ``job_finished`` or ``job_abandoned``."""
        return None

    def job_finished(self, job: Job, outcome: Outcome, state: Any) -> None:
        """``job``'s run led to ``outcome``; ``state`` is ``job_started``'s, or
        ``None`` for a job refused unrun (its deadline passed). A snooze
        (``outcome.kind == "snooze"``) is neither a success nor a failure; a
        discard is a ``dead`` outcome whose ``exc`` is the ``Discard``."""

    def job_abandoned(self, job: Job, state: Any) -> None:
        """``job``'s run was cancelled (shutdown): no outcome, it stays queued."""

    async def run(
        self, backend: Any, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """A background service for ``backend``, in its task group, cancelled
        at shutdown (metrics refresh their queue counts here).

        ``backend`` is the ``Backend``; observers that use it say so (typing
        it here would make ``_backend`` and this module import each other).
        """
        task_status.started()


class _Fanout(Observer):
    """Several observers as one; each hook calls them in order."""

    __slots__ = ("_observers",)

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = tuple(observers)

    def enqueue_started(self, job: Job) -> tuple[Job, Any]:
        states = []
        for observer in self._observers:
            job, state = observer.enqueue_started(job)
            states.append(state)
        return job, states

    def enqueue_finished(
        self, state: Any, job: Job, job_id: str | None, exc: BaseException | None
    ) -> None:
        # Reversed: contexts made current in *_started are restored last in, first out.
        for observer, own in reversed(tuple(zip(self._observers, state, strict=True))):
            observer.enqueue_finished(own, job, job_id, exc)

    def tick_enqueued(self, queue: str) -> None:
        for observer in self._observers:
            observer.tick_enqueued(queue)

    def job_started(self, job: Job) -> Any:
        return [observer.job_started(job) for observer in self._observers]

    def job_finished(self, job: Job, outcome: Outcome, state: Any) -> None:
        states = state if state is not None else [None] * len(self._observers)
        for observer, own in reversed(tuple(zip(self._observers, states, strict=True))):
            observer.job_finished(job, outcome, own)

    def job_abandoned(self, job: Job, state: Any) -> None:
        for observer, own in reversed(tuple(zip(self._observers, state, strict=True))):
            observer.job_abandoned(job, own)

    async def run(
        self, backend: Any, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            for observer in self._observers:
                await tg.start(observer.run, backend)
            task_status.started()


def combine(observers: Sequence[Observer]) -> Observer | None:
    """One observer for all of ``observers``; ``None`` when there are none."""
    if not observers:
        return None
    if len(observers) == 1:
        return observers[0]
    return _Fanout(observers)
