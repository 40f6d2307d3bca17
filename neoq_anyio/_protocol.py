"""The interface both backends satisfy, for annotating code that takes either."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import logging
    from contextlib import AbstractAsyncContextManager
    from datetime import tzinfo

    import psycopg

    from ._base import BackendStatistics
    from ._models import Handler, Job
    from ._pg._connection import AnyioConnection

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """What ``open_backend`` yields: the PostgreSQL or the in-memory backend.

    Write handlers and application code against this, and switch backends by
    changing the connection string alone.
    """

    async def enqueue(
        self, job: Job, *, connection: psycopg.AsyncConnection[Any] | None = None
    ) -> str:
        """Add a job to its queue and return its id."""
        ...

    async def start(self, handler: Handler) -> None:
        """Start processing ``handler.queue``; returns once new jobs cannot be missed."""
        ...

    async def start_cron(
        self, spec: str, handler: Handler, *, timezone: tzinfo | None = None
    ) -> Handler:
        """Run ``handler`` once per tick of ``spec``."""
        ...

    def connection(self) -> AbstractAsyncContextManager[AnyioConnection]:
        """Lend a database connection (PostgreSQL only)."""
        ...

    def set_logger(self, logger: logging.Logger) -> None:
        """Send log records to ``logger``."""
        ...

    def statistics(self) -> BackendStatistics:
        """A snapshot of queues, jobs in flight and connections."""
        ...

    async def shutdown(self) -> None:
        """Stop, as leaving the ``open_backend`` block does."""
        ...
