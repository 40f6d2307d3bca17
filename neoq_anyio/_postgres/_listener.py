"""The LISTEN connection: one per backend, never shared with queries.

psycopg's notification reader holds the connection lock while it waits, so a
query on the same connection would stall behind it; the listener therefore
owns a connection of its own and is the only task that touches it. New
channels are handed to it through ``listen()``, which interrupts its wait.

LISTEN belongs to a server session, so this connection must have one of its
own: a direct connection, or one through session pooling. Behind a
transaction pooler it goes to ``listen_connection_string``; without one the
backend starts no listener at all, and the pending-job poller wakes the
workers instead (``_scheduler``).

When the connection drops (database restart, ``pg_terminate_backend``, a
network cut caught by the periodic ping), the listener reconnects with
capped exponential backoff, listens to every channel again, and calls
``on_reconnect`` so the backend looks for jobs announced while it was deaf.

A link can also die silently (a partition, a peer that vanished): nothing
arrives and nothing fails, and TCP would only give up after minutes. So the
ping and every LISTEN must be answered within ``ping_timeout``, or the
connection is dropped at once (no cancel request over a dead link: its
``cancel_grace`` is 0) and replaced. A silent link is noticed within
``ping_interval + ping_timeout``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, NoReturn

import anyio
from psycopg import sql
from psycopg.generators import notifies

from neoq_anyio._exceptions import DatabaseError
from neoq_anyio._pg._errors import map_errors

from . import _sql

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import TaskStatus
    from psycopg import Notify
    from psycopg.abc import Query

    from neoq_anyio._log import BackendLog
    from neoq_anyio._pg._connection import AnyioConnection

__all__ = ["Listener"]

_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 5.0
_PING_INTERVAL = 30.0
_PING_TIMEOUT = 10.0


class Listener:
    """Owns the LISTEN connection and turns notifications into calls.

    Args:
        connect: opens a new autocommit connection.
        on_notify: ``on_notify(channel, payload)``, called for every
            notification; must not block.
        on_reconnect: called after the connection was re-established.
        log: the backend's log.
        ping_interval: seconds without a notification after which the
            connection is pinged.
        ping_timeout: seconds a ping or a LISTEN may go unanswered before
            the connection is taken for dead and replaced.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[AnyioConnection]],
        on_notify: Callable[[str, str], None],
        on_reconnect: Callable[[], None],
        *,
        log: BackendLog,
        ping_interval: float = _PING_INTERVAL,
        ping_timeout: float = _PING_TIMEOUT,
    ) -> None:
        self._connect = connect
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self._log = log
        self._channels: set[str] = set()  # LISTEN in force on the current connection
        self._requested: dict[str, anyio.Event] = {}  # channel -> set once listening
        self._wait_scope: anyio.CancelScope | None = None
        self.reconnects = 0

    async def listen(self, channel: str) -> None:
        """Return once ``LISTEN channel`` is in force (waits out a reconnection)."""
        if channel in self._channels:
            return
        event = self._requested.setdefault(channel, anyio.Event())
        if self._wait_scope is not None:
            self._wait_scope.cancel(reason="a new channel")  # the listener task runs the LISTEN
        await event.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> NoReturn:
        """Serve until cancelled. The first connection's failure raises (startup
        fails loudly); later failures reconnect."""
        conn = await self._open()
        task_status.started()
        delay = _RECONNECT_MIN
        while True:
            try:
                with map_errors(self._log.redact, "listener"):
                    await self._serve(conn)
            except DatabaseError as exc:
                self._log.warning("listener connection lost, reconnecting: %s", exc)
            finally:
                conn.pgconn.finish()
            while True:
                # Jitter keeps many processes from reconnecting in lockstep.
                await anyio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _RECONNECT_MAX)
                try:
                    conn = await self._open()
                except DatabaseError as exc:
                    self._log.warning("listener cannot reconnect yet: %s", exc)
                    continue
                break
            delay = _RECONNECT_MIN
            self.reconnects += 1
            for channel in self._channels:
                self._requested.setdefault(channel, anyio.Event())
            self._channels.clear()
            self._log.info("listener reconnected")

    async def _open(self) -> AnyioConnection:
        conn = await self._connect()
        # A query given up on closes the connection at once: a cancel request
        # would cross the same dead link, and the connection is replaced anyway.
        conn.cancel_grace = 0
        return conn

    async def _serve(self, conn: AnyioConnection) -> None:
        conn.add_notify_handler(self._dispatch)
        reconnected = self.reconnects > 0
        while True:
            while self._requested:
                channel, event = next(iter(self._requested.items()))
                await self._answered(conn, _sql.LISTEN.format(sql.Identifier(channel)), "LISTEN")
                self._channels.add(channel)
                del self._requested[channel]
                event.set()
            if reconnected:
                # Jobs enqueued while nobody listened were announced to no one.
                reconnected = False
                self._on_reconnect()
            with anyio.CancelScope() as scope:
                self._wait_scope = scope
                with anyio.move_on_after(self._ping_interval) as ping:
                    await conn.wait(notifies(conn.pgconn))
            self._wait_scope = None
            if ping.cancelled_caught:
                await self._answered(conn, _sql.PING, "ping")  # finds dead links

    async def _answered(self, conn: AnyioConnection, query: Query, what: str) -> None:
        """Run ``query``; raise ``DatabaseError`` if no answer comes within ``ping_timeout``."""
        with anyio.move_on_after(self._ping_timeout) as bound:
            await conn.execute(query)
        if bound.cancelled_caught:
            raise DatabaseError(
                f"listener: no answer to {what} within {self._ping_timeout:g} s (dead link?)"
            )

    def _dispatch(self, notification: Notify) -> None:
        self._on_notify(notification.channel, notification.payload)
