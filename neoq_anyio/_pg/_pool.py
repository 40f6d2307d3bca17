"""An AnyIO-native connection pool.

``psycopg_pool`` is built on free-running asyncio tasks and does not open
under trio, so neoq_anyio keeps its own small pool. It follows pgxpool's
model and options (``pool_max_conns``, ``pool_min_conns``, lifetimes, idle
time, health-check period, lifetime jitter) because users bring those from
Go neoq's connection strings.

Design:

* Idle connections sit on a LIFO stack, so a busy process reuses warm
  connections and the cold ones age out.
* Waiters queue FIFO; a released connection (or a free slot, when a
  connection is discarded) is handed to the oldest waiter directly.
* Whoever needs a new connection opens it itself, in its own task: nothing
  runs outside the caller's or the maintenance task's scope.
* Maintenance (``run()``) lives in the backend's task group: it closes
  connections past their lifetime or idle time and keeps ``min_conns`` open.
* A connection comes back with its query finished (see ``_connection``); a
  transaction left open is rolled back, and a connection in any doubtful
  state is closed rather than reused.
"""

from __future__ import annotations

import math
import os
import random
import select
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from psycopg import errors as e
from psycopg import pq

from neoq_anyio._exceptions import ConfigurationError, DatabaseError, PoolTimeoutError
from neoq_anyio._log import BackendLog, default_log

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from anyio.abc import TaskStatus

    from ._connection import AnyioConnection

__all__ = [
    "ConnectionPool",
    "PoolOptions",
    "PoolOptionsError",
    "PoolStatistics",
    "default_max_conns",
]

_IDLE = pq.TransactionStatus.IDLE
_OK = pq.ConnStatus.OK
_RESET_TIMEOUT = 5.0


def default_max_conns() -> int:
    """Return pgxpool's default pool size: the number of CPUs, at least 4."""
    return max(4, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """Connection pool settings, named and defaulted like Go's pgxpool.

    Durations are in seconds.

    Raises:
        PoolOptionsError: On construction, if a value is out of range or not a number
            (a :class:`ConfigurationError`).
    """

    max_conns: int = field(default_factory=default_max_conns)
    min_conns: int = 0
    max_conn_lifetime: float = 3600.0
    max_conn_idle_time: float = 1800.0
    health_check_period: float = 60.0
    max_conn_lifetime_jitter: float = 0.0

    def __post_init__(self) -> None:
        _check_pool_options(self)


class PoolOptionsError(ConfigurationError):
    """A :class:`PoolOptions` value is out of range or not a number.

    The message names the field and its value. A caller that read the value from text
    (the connection-string parser) names the option and the text its own way, with
    :attr:`option` and :meth:`reason`.

    Attributes:
        option: The offending field, such as ``"min_conns"``.
    """

    def __init__(self, option: str, value: object, expected: str, reason: str = "") -> None:
        super().__init__(f"{option} must be {expected}, got {value!r}")
        self.option = option
        self._reason = reason or f"must be {expected}"

    def reason(self, prefix: str = "") -> str:
        """Say what is wrong with the value, without quoting it.

        Args:
            prefix: Written before the names of the other options the reason mentions
                (``"pool_"`` for pgxpool's names), as in ``"must not exceed max_conns (4)"``.
        """
        return self._reason.format(prefix=prefix)


# Duration fields, in pgxpool's order, and whether zero is refused too.
_DURATION_FIELDS = (
    ("max_conn_lifetime", False),
    ("max_conn_idle_time", False),
    ("health_check_period", True),
    ("max_conn_lifetime_jitter", False),
)


def _check_pool_options(options: PoolOptions) -> None:
    """Raise :class:`PoolOptionsError` for the first value of ``options`` out of range.

    This is the one range check of the pool options: the connection-string parser only
    turns text into numbers and leaves the ranges to it.
    """
    max_conns, min_conns = options.max_conns, options.min_conns
    if _is_bad_int(max_conns) or max_conns < 1:
        raise PoolOptionsError("max_conns", max_conns, "an integer greater than 0")
    expected = f"an integer from 0 to max_conns ({max_conns})"
    if _is_bad_int(min_conns) or min_conns < 0:
        raise PoolOptionsError(
            "min_conns", min_conns, expected, "must be an integer greater than or equal to 0"
        )
    if min_conns > max_conns:
        raise PoolOptionsError(
            "min_conns", min_conns, expected, f"must not exceed {{prefix}}max_conns ({max_conns})"
        )
    for name, positive in _DURATION_FIELDS:
        value = getattr(options, name)
        expected = f"a {'positive' if positive else 'non-negative'} number of seconds"
        if _is_bad_float(value):
            raise PoolOptionsError(name, value, expected)
        if value < 0 or (positive and value == 0):
            reason = "must be greater than 0" if positive else "must not be negative"
            raise PoolOptionsError(name, value, expected, reason)


def _is_bad_int(value: object) -> bool:
    # bool is an int subclass, but not a count.
    return isinstance(value, bool) or not isinstance(value, int)


def _is_bad_float(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return True
    return not math.isfinite(value)


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of the pool: connections open, idle, lent out, and tasks waiting."""

    size: int
    idle: int
    in_use: int
    waiting: int
    max_size: int


class _Waiter:
    __slots__ = ("conn", "event", "slot")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.conn: AnyioConnection | None = None
        self.slot = False  # granted the right to open a new connection


class _Entry:
    """Bookkeeping the pool keeps beside each connection it opened."""

    __slots__ = ("expires_at", "idle_since")

    def __init__(self, expires_at: float) -> None:
        self.expires_at = expires_at
        self.idle_since = 0.0


def _clean(conn: AnyioConnection) -> bool:
    """Open, idle, and not inside a psycopg transaction block."""
    pgconn = conn.pgconn
    return (
        pgconn.status == _OK and pgconn.transaction_status == _IDLE and not conn._num_transactions
    )


def _looks_alive(conn: AnyioConnection) -> bool:
    """Cheap liveness check for an idle connection, without a round trip.

    An idle pooled connection has nothing to read unless the server is
    closing it (restart, ``pg_terminate_backend``, idle timeout) or sent
    something unsolicited; either way a fresh connection is the safe choice.
    """
    if not _clean(conn):
        return False
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    return not poller.poll(0)


class ConnectionPool:
    """Lends AnyioConnections, at most ``options.max_conns`` at a time.

    Args:
        connect: opens and configures a new connection.
        options: sizes and lifetimes from the connection string.
        connection_timeout: default seconds ``acquire`` waits before
            ``PoolTimeoutError``.
        log: where the pool and its connections log; it also scrubs
            secrets from messages that reach errors.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[AnyioConnection]],
        options: PoolOptions,
        *,
        connection_timeout: float,
        log: BackendLog | None = None,
    ) -> None:
        self._log = log or default_log()
        self._connect = connect
        self._options = options
        self._timeout = connection_timeout
        self._idle: list[AnyioConnection] = []
        self._entries: dict[int, _Entry] = {}
        self._waiters: deque[_Waiter] = deque()
        self._size = 0  # connections open or being opened
        self._closed = False

    # -- lending -------------------------------------------------------------

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[AnyioConnection]:
        """Lend a connection for the block; it returns to the pool afterwards.

        Raises:
            PoolTimeoutError: none was free within ``timeout`` (default:
                ``connection_timeout``).
            DatabaseError: a new connection could not be opened.
        """
        conn = await self.acquire(timeout)
        try:
            yield conn
        finally:
            await self.release(conn)

    async def acquire(self, timeout: float | None = None) -> AnyioConnection:
        """Take a connection out of the pool; give it back with ``release``.

        Raises:
            PoolTimeoutError: none was free within ``timeout`` (default:
                ``connection_timeout``; ``math.inf`` waits for ever).
            DatabaseError: a new connection could not be opened.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise DatabaseError("the connection pool is closed")
        while self._idle:
            conn = self._idle.pop()
            if self._usable(conn):
                return conn
            self._discard(conn)
        timeout = self._timeout if timeout is None else timeout
        with anyio.move_on_after(timeout) as scope:
            if self._size < self._options.max_conns:
                self._size += 1
                return await self._open()
            return await self._wait_for_connection()
        assert scope.cancelled_caught
        raise PoolTimeoutError(
            f"no pooled connection became free within {timeout:g} s "
            f"(pool_max_conns={self._options.max_conns}); "
            "raise pool_max_conns or connection_timeout"
        )

    async def _wait_for_connection(self) -> AnyioConnection:
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            # Timed out or cancelled: leave the queue, and pass on whatever
            # was handed over meanwhile so it is not lost.
            if waiter.conn is not None:
                self._put(waiter.conn)
            elif waiter.slot:
                self._size -= 1
                self._grant_slot()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        if waiter.conn is not None:
            return waiter.conn
        if not waiter.slot:
            raise DatabaseError("the connection pool is closed")
        return await self._open()  # granted a slot: this task opens a connection

    async def _open(self) -> AnyioConnection:
        """Open a connection into a slot already counted in ``_size``."""
        try:
            conn = await self._connect()
        except BaseException:
            self._size -= 1
            self._grant_slot()
            raise
        conn.log = self._log
        lifetime = self._options.max_conn_lifetime
        if lifetime > 0:
            lifetime += random.uniform(0, self._options.max_conn_lifetime_jitter)
        expires = anyio.current_time() + lifetime if lifetime > 0 else math.inf
        self._entries[id(conn)] = _Entry(expires)
        return conn

    async def release(self, conn: AnyioConnection) -> None:
        """Give a connection back. Open transactions are rolled back; broken
        or doubtful connections are closed instead of reused."""
        pgconn = conn.pgconn
        if pgconn.transaction_status != _IDLE and pgconn.status == _OK and not self._closed:
            # Shielded: release often runs in a block being cancelled, and a
            # connection must come back either clean or closed.
            with anyio.move_on_after(_RESET_TIMEOUT, shield=True):
                try:
                    await conn.rollback()
                except e.Error as exc:
                    self._log.debug("rollback on release failed: %s", exc)
        if pgconn.transaction_status == _IDLE:
            conn._autocommit = True  # internal work batches its own BEGIN/COMMIT
        # No socket poll here: the connection was just in use, and the next
        # acquire from the idle stack looks at the socket anyway.
        if self._usable(conn, poll=False):
            self._put(conn)
        else:
            self._discard(conn)

    def _usable(self, conn: AnyioConnection, *, poll: bool = True) -> bool:
        entry = self._entries.get(id(conn))
        if self._closed or entry is None or entry.expires_at <= anyio.current_time():
            return False
        return _looks_alive(conn) if poll else _clean(conn)

    def _put(self, conn: AnyioConnection) -> None:
        """Hand a healthy connection to the oldest waiter, or park it idle."""
        if self._closed:
            self._discard(conn)
            return
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.conn = conn
            waiter.event.set()
            return
        self._entries[id(conn)].idle_since = anyio.current_time()
        self._idle.append(conn)

    def _discard(self, conn: AnyioConnection) -> None:
        """Close a connection and let a waiter open a replacement."""
        self._entries.pop(id(conn), None)
        conn.pgconn.finish()
        self._size -= 1
        self._grant_slot()

    def _grant_slot(self) -> None:
        if self._waiters and self._size < self._options.max_conns and not self._closed:
            waiter = self._waiters.popleft()
            self._size += 1
            waiter.slot = True
            waiter.event.set()

    # -- maintenance -----------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Maintenance loop, run in the backend's task group until cancelled.

        Every ``health_check_period`` it closes idle connections past their
        lifetime or idle time, or found dead, and tops the pool up to
        ``min_conns``.
        """
        task_status.started()
        while True:
            await self._check_idle()
            await self._fill_to_minimum()
            await anyio.sleep(self._options.health_check_period)

    async def _check_idle(self) -> None:
        now = anyio.current_time()
        max_idle = self._options.max_conn_idle_time
        keep: list[AnyioConnection] = []
        for conn in self._idle:
            entry = self._entries[id(conn)]
            # _size drops with each discard, so min_conns stay open.
            too_idle = (
                max_idle > 0
                and now - entry.idle_since > max_idle
                and self._size > self._options.min_conns
            )
            if too_idle or not self._usable(conn):
                self._discard(conn)
            else:
                keep.append(conn)
        self._idle[:] = keep
        await anyio.lowlevel.checkpoint()

    async def _fill_to_minimum(self) -> None:
        while not self._closed and self._size < self._options.min_conns:
            self._size += 1
            try:
                conn = await self._open()
            except DatabaseError as exc:
                self._log.warning("pool could not open a connection: %s", exc)
                return
            self._put(conn)

    def _in_use(self) -> int:
        return self._size - len(self._idle)

    # -- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Close idle connections now; lent ones are closed when released."""
        self._closed = True
        for conn in self._idle:
            self._entries.pop(id(conn), None)
            conn.pgconn.finish()
            self._size -= 1
        self._idle.clear()
        for waiter in self._waiters:
            waiter.event.set()  # woken with nothing: they raise below
        self._waiters.clear()

    def statistics(self) -> PoolStatistics:
        """Current counts, for monitoring and tests."""
        return PoolStatistics(
            size=self._size,
            idle=len(self._idle),
            in_use=self._in_use(),
            waiting=len(self._waiters),
            max_size=self._options.max_conns,
        )
