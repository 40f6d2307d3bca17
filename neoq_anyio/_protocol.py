"""The interface both backends satisfy, for annotating code that takes either."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import logging
    from contextlib import AbstractAsyncContextManager
    from datetime import tzinfo

    import psycopg

    from ._backend import BackendStatistics
    from ._models import Handler, Job
    from ._pg._connection import AnyioConnection

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """What ``open_backend`` yields: the PostgreSQL or the in-memory backend.

    Write handlers and application code against this, and switch backends by
    changing the connection string alone. Every method must be called while
    the ``open_backend`` block is open. ``isinstance(nq, Backend)`` works.
    """

    async def enqueue(
        self, job: Job, *, connection: psycopg.AsyncConnection[Any] | None = None
    ) -> str:
        """Add a job to its queue and return its id.

        Args:
            job: the job; its queue must not be empty.
            connection: enqueue inside this connection's open transaction,
                so the job exists only if that transaction commits: one from
                ``connection()`` (any loop) or, on asyncio, any psycopg
                ``AsyncConnection``. PostgreSQL only.

        Returns:
            The job's id, a string.

        Raises:
            NoQueueError: the job has no queue.
            InvalidJobError: the payload is not a JSON object, a timestamp is
                naive, or ``max_retries`` is negative.
            DuplicateJobError: an unprocessed job with the same queue,
                fingerprint and status exists; nothing was inserted.
            PoolTimeoutError: no pooled connection was free within
                ``connection_timeout`` (PostgreSQL).
            DatabaseError: PostgreSQL failed.
            NoTransactionError: ``connection`` was given to the in-memory
                backend.
            NeoqError: the backend is shut down.
        """
        ...

    async def start(self, handler: Handler) -> None:
        """Start ``handler.concurrency`` workers for ``handler.queue``.

        Returns once the queue is listened to, so a job enqueued right after
        is never missed. Jobs already due on the queue are picked up.

        Raises:
            ConfigurationError: the queue is empty or already has a handler,
                or the handler's ``job_timeout`` exceeds the backend's
                ``transaction_timeout`` (the message says which to change).
            NeoqError: the backend is shut down.
        """
        ...

    async def start_cron(
        self, spec: str, handler: Handler, *, timezone: tzinfo | None = None
    ) -> Handler:
        """Enqueue a job on the handler's queue at every tick of ``spec``, and start the handler.

        Args:
            spec: a robfig/cron spec: five fields (minute first), six with a
                leading seconds field, ``@yearly`` ... ``@hourly``, or
                ``@every <Go duration>`` (whole seconds, at least one).
            handler: runs the ticks' jobs. With an empty queue name
                (``Handler("", fn)``) the queue is named from the schedule's
                English description, as Go neoq names it (``"* * * * * *"``
                gives ``every_second``).
            timezone: the zone the cron fields are read in (default UTC);
                ``@every`` ignores it.

        Returns:
            The handler as started, with its queue name.

        Each tick's job has the payload ``{"tick": "<ISO 8601 time, UTC>"}``
        and is enqueued once however many processes run the same cron.

        Raises:
            ConfigurationError: the spec is malformed (nothing is scheduled),
                or the handler is refused as by ``start``.
            NeoqError: the backend is shut down.
        """
        ...

    def connection(self) -> AbstractAsyncContextManager[AnyioConnection]:
        """Lend a pooled connection for your own transactions, on any loop.

        Use it as ``async with nq.connection() as conn:``. Statements open a
        transaction; when the block ends, an open transaction is committed,
        or rolled back if the block raised. Pass ``conn`` to ``enqueue`` to
        enqueue atomically with your own writes.

        Raises:
            PoolTimeoutError: no pooled connection was free within
                ``connection_timeout``.
            DatabaseError: a connection could not be opened, or the commit
                failed.
            NoTransactionError: on the in-memory backend, which has no
                database.
            NeoqError: the backend is shut down.
        """
        ...

    def set_logger(self, logger: logging.Logger) -> None:
        """Send the backend's log records to ``logger`` from now on."""
        ...

    def statistics(self) -> BackendStatistics:
        """A snapshot of the queues with a handler, the jobs running now and the pool's use."""
        ...

    async def shutdown(self) -> None:
        """Shut down while the ``open_backend`` block goes on, as leaving it would.

        Stops taking jobs, lets jobs in flight finish for up to
        ``shutdown_timeout`` seconds, then cancels them (their transactions
        roll back, so they stay queued) and every background task. Calling
        it again waits for the first call to finish. Afterwards ``enqueue``,
        ``start``, ``start_cron`` and ``connection`` raise ``NeoqError``.
        """
        ...
