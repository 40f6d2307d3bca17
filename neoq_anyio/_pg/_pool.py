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
  ``_assign`` is the one synchronous step that serves waiters from the idle
  stack and with slots, run after every change.
* Workers (``acquire(worker=True)``) hold at most ``worker_share(max_size)``
  connections: ``RESERVED_CONNS`` stay for ``enqueue``, ``nq.connection()``
  and the background tasks, and those callers, when they wait, are served
  before waiting workers. So enqueueing never starves behind busy workers,
  and a handler that enqueues never deadlocks. A pool whose size was not
  given grows to fit the workers (``add_workers``).
* Whoever needs a new connection opens it itself, in its own task: nothing
  runs outside the caller's or the maintenance task's scope. At most
  ``_MAX_OPENING`` are being opened at once; other callers wait for one of
  those or for a released connection.
* Maintenance (``run()``) lives in the backend's task group: it closes
  connections past their lifetime or idle time and keeps ``min_conns`` open.
* A connection comes back with its query finished (see ``_connection``); a
  transaction left open is rolled back, and a connection in any doubtful
  state (locked, broken, still running a query) is closed rather than reused.
* A connection handed to user code (``lend``) is reset as it comes back: its
  session with ``RESET_SESSION`` and the session setup in one round trip, and
  psycopg's client-side state by moving the session into a new connection
  object. Connections only the library used skip that round trip. Behind a
  transaction pooler the client connection has no server session of its own
  to reset: ``session_reset`` is then empty (no round trip) or, where the
  pooler keeps prepared statements per client, ``DEALLOCATE ALL``.
* ``prepared_statements=False`` turns psycopg's automatic server-side
  prepared statements off on every connection the pool hands out, the fresh
  objects of a reset included: behind a transaction pooler, a statement
  prepared in one transaction's server session is unknown to the next one's.
"""

from __future__ import annotations

import math
import random
import select
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from weakref import WeakSet

import anyio
from psycopg import errors as e
from psycopg import pq

from neoq_anyio._exceptions import DatabaseError, PoolTimeoutError
from neoq_anyio._log import BackendLog, default_log

from ._connection import AnyioConnection

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, MutableSet

    from anyio.abc import TaskStatus

    from ._pool_options import PoolOptions

__all__ = [
    "RESERVED_CONNS",
    "RESET_SESSION",
    "ConnectionPool",
    "PoolStatistics",
    "worker_share",
]

_IDLE = pq.TransactionStatus.IDLE
_ACTIVE = pq.TransactionStatus.ACTIVE
_OK = pq.ConnStatus.OK
_RESET_TIMEOUT = 5.0

RESET_SESSION: Final = (
    b"CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; "
    b"UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; "
    b"DISCARD SEQUENCES"
)
"""What ``DISCARD ALL`` does, spelled out as PostgreSQL documents it: cursors,
session settings, prepared statements, LISTENs, session advisory locks, cached
plans, temporary tables and sequence caches go. ``DISCARD ALL`` itself refuses
to run in a multi-statement query, and this way the session's own setup can
follow in the same round trip."""


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of the pool: connections open, idle, lent out, and tasks waiting.

    Attributes:
        size: connections open, or being opened.
        idle: connections parked in the pool.
        in_use: connections lent out (``size - idle``).
        waiting: tasks waiting for a connection, workers included.
        max_size: the most connections the pool opens: ``pool_max_conns``, or,
            when that was not given, enough for the started handlers' workers
            plus the reserve.
        worker_in_use: connections lent to workers for their jobs (part of ``in_use``).
        worker_max_size: the most connections workers may hold at once; the rest
            of ``max_size`` stays free for ``enqueue``, ``connection()`` and the
            background tasks.
    """

    size: int
    idle: int
    in_use: int
    waiting: int
    max_size: int
    worker_in_use: int = 0
    worker_max_size: int = 0


#: Connections the workers never take: ``enqueue``, ``nq.connection()`` and the
#: background tasks (schedulers, cron) share them. Two, so that a caller holding
#: ``nq.connection()`` can still ``enqueue()`` beside it while every worker is busy.
RESERVED_CONNS = 2

# Connections being opened at once. A sweep wakes every idle worker at once;
# without a bound each would open a connection that the others, finding the
# queue empty, hand back a moment later.
_MAX_OPENING = 2


def worker_share(max_size: int) -> int:
    """The most connections workers may hold in a pool of ``max_size``: all but
    ``RESERVED_CONNS``, and at least one, or no job could ever run."""
    return max(1, max_size - RESERVED_CONNS)


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
    """Open, idle, not inside a psycopg transaction block, and not locked.

    A held lock means something still uses the connection: typically a
    ``notifies()`` generator left with ``break``, which keeps the lock until
    it is garbage-collected, and would make the next query fail.
    """
    pgconn = conn.pgconn
    return (
        pgconn.status == _OK
        and pgconn.transaction_status == _IDLE
        and not conn._num_transactions
        and not conn.lock.locked()
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
    """Lends AnyioConnections, at most ``statistics().max_size`` at a time.

    Args:
        connect: opens and configures a new connection.
        options: sizes and lifetimes from the connection string.
        connection_timeout: default seconds ``acquire`` waits before
            ``PoolTimeoutError``.
        log: where the pool and its connections log; it also scrubs
            secrets from messages that reach errors.
        session_setup: the statements ``connect`` ran to configure a new
            session; a connection lent to user code runs them again after
            ``session_reset``.
        session_reset: what resets the session of a connection lent to
            user code (``RESET_SESSION``); empty: no round trip.
        prepared_statements: whether psycopg may prepare statements on the
            server (after ``prepare_threshold`` uses, psycopg's default).
        lent: connections handed to user code, which the pool resets as they
            come back (see ``lend``). The PostgreSQL backend passes the set
            ``current_transaction()`` adds to; by default, a set of the pool's own.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[AnyioConnection]],
        options: PoolOptions,
        *,
        connection_timeout: float,
        log: BackendLog | None = None,
        session_setup: bytes = b"",
        session_reset: bytes = RESET_SESSION,
        prepared_statements: bool = True,
        lent: MutableSet[Any] | None = None,
    ) -> None:
        self._log = log or default_log()
        self._connect = connect
        self._options = options
        self._timeout = connection_timeout
        self._reset_query = b"; ".join(q for q in (session_reset, session_setup) if q)
        self._prepared_statements = prepared_statements
        self._lent: MutableSet[Any] = WeakSet() if lent is None else lent
        self._idle: list[AnyioConnection] = []
        self._entries: dict[int, _Entry] = {}
        self._waiters: deque[_Waiter] = deque()  # everyone but workers: served first
        self._worker_waiters: deque[_Waiter] = deque()
        self._size = 0  # connections open or being opened
        self._opening = 0  # of which being opened
        self._max_size = options.max_conns
        self._workers = 0  # worker tasks counted by add_workers
        self._worker_max = worker_share(self._max_size)
        self._worker_held = 0  # connections (or slots) lent to workers
        self._worker_conns: set[int] = set()  # ids of the connections workers hold
        self._closed = False

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<ConnectionPool size={s.size}/{s.max_size} idle={s.idle} in_use={s.in_use} "
            f"workers={s.worker_in_use}/{s.worker_max_size} waiting={s.waiting}>"
        )

    # -- sizing ----------------------------------------------------------------------------

    def add_workers(self, count: int) -> None:
        """Count ``count`` more workers, each holding a connection while it runs a job.

        A pool whose ``max_conns`` was not given grows to hold every worker
        plus ``RESERVED_CONNS``; a given size is kept. Either way the workers
        may hold ``worker_share(max_size)`` connections at once, so they never
        take the reserve.
        """
        self._workers += count
        if not self._options.max_conns_given:
            self._max_size = max(self._options.max_conns, self._workers + RESERVED_CONNS)
        self._worker_max = worker_share(self._max_size)
        self._assign()

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

    async def acquire(
        self, timeout: float | None = None, *, worker: bool = False
    ) -> AnyioConnection:
        """Take a connection out of the pool; give it back with ``release``.

        Args:
            timeout: seconds to wait (default: ``connection_timeout``;
                ``math.inf`` waits for ever).
            worker: for a worker's job. Workers hold at most
                ``worker_max_size`` connections at once, and every other
                caller waiting is served before them.

        Raises:
            PoolTimeoutError: none was free within ``timeout``.
            DatabaseError: a new connection could not be opened.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise DatabaseError("the connection pool is closed")
        if self._may_serve(worker):
            while self._idle:
                conn = self._idle.pop()
                if self._usable(conn):
                    self._hand_out(conn, worker)
                    return conn
                self._discard(conn)
        timeout = self._timeout if timeout is None else timeout
        with anyio.move_on_after(timeout) as scope:
            if self._may_serve(worker) and self._may_open():
                self._take_slot(worker)
                return await self._open(worker)
            return await self._wait_for_connection(worker)
        assert scope.cancelled_caught
        raise PoolTimeoutError(
            f"no pooled connection became free within {timeout:g} s "
            f"(pool_max_conns={self._max_size}); "
            "raise pool_max_conns or connection_timeout"
        )

    def lend(self, conn: AnyioConnection) -> None:
        """Mark ``conn`` as handed to user code: ``release`` resets it before reuse.

        The reset (one round trip) undoes what the user may have changed: the
        session's settings, LISTENs, temporary tables, advisory locks,
        prepared statements and cursors (``RESET_SESSION`` and
        ``session_setup``), and psycopg's side of it (row factory, adapters,
        prepared-statement cache, isolation level, notice and notify
        handlers), by handing the session on in a new connection object.
        """
        self._lent.add(conn)

    def _may_serve(self, worker: bool) -> bool:
        """Whether a new caller of this kind may take a connection without queueing."""
        if worker:
            return not self._worker_waiters and self._worker_held < self._worker_max
        return not self._waiters

    def _may_open(self) -> bool:
        return self._size < self._max_size and self._opening < _MAX_OPENING and not self._closed

    def _take_slot(self, worker: bool) -> None:
        """Count a connection about to be opened (``_open`` settles it)."""
        self._size += 1
        self._opening += 1
        if worker:
            self._worker_held += 1

    def _hand_out(self, conn: AnyioConnection, worker: bool) -> None:
        if worker:
            self._worker_held += 1
            self._worker_conns.add(id(conn))

    async def _wait_for_connection(self, worker: bool) -> AnyioConnection:
        waiter = _Waiter()
        queue = self._worker_waiters if worker else self._waiters
        queue.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            # Timed out or cancelled: leave the queue, and pass on whatever
            # was handed over meanwhile so it is not lost.
            if waiter.conn is not None:
                if worker:
                    self._worker_held -= 1
                self._put(waiter.conn)
            elif waiter.slot:
                self._size -= 1
                self._opening -= 1
                if worker:
                    self._worker_held -= 1
                self._assign()
            elif waiter in queue:
                queue.remove(waiter)
            raise
        if waiter.conn is not None:
            if worker:
                self._worker_conns.add(id(waiter.conn))
            return waiter.conn
        if not waiter.slot:
            raise DatabaseError("the connection pool is closed")
        return await self._open(worker)  # granted a slot: this task opens a connection

    async def _open(self, worker: bool = False) -> AnyioConnection:
        """Open a connection into a slot already counted (``_take_slot``)."""
        try:
            conn = await self._connect()
        except BaseException:
            self._size -= 1
            if worker:
                self._worker_held -= 1
            raise
        finally:
            self._opening -= 1
            self._assign()  # another connection may be opened now
        conn.log = self._log
        if not self._prepared_statements:
            conn.prepare_threshold = None
        lifetime = self._options.max_conn_lifetime
        if lifetime > 0:
            lifetime += random.uniform(0, self._options.max_conn_lifetime_jitter)
        expires = anyio.current_time() + lifetime if lifetime > 0 else math.inf
        self._entries[id(conn)] = _Entry(expires)
        if worker:
            self._worker_conns.add(id(conn))
        return conn

    async def release(self, conn: AnyioConnection) -> None:
        """Give a connection back. Open transactions are rolled back; broken
        or doubtful connections are closed instead of reused; connections
        handed to user code (``lend``) are reset first."""
        if id(conn) in self._worker_conns:
            self._worker_conns.discard(id(conn))
            self._worker_held -= 1
        if self._lent and conn in self._lent:
            self._lent.discard(conn)
            reset = await self._reset(conn)
            if reset is None:
                return
            conn = reset
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

    async def _reset(self, conn: AnyioConnection) -> AnyioConnection | None:
        """The session of a connection user code had, reset and in a new
        connection object; ``None`` if it was closed instead.

        A new object, because psycopg keeps a connection's client-side state
        (row factory, adapters, prepared statements, isolation level,
        handlers) on it, and the user may have changed any of it; the old
        object is left to the garbage collector. A connection still locked
        (a ``notifies()`` left open may run its cleanup on it at any time),
        running a query or broken is closed instead.
        """
        pgconn = conn.pgconn
        if (
            self._closed
            or pgconn.status != _OK
            or pgconn.transaction_status == _ACTIVE
            or conn.lock.locked()
            or id(conn) not in self._entries
        ):
            self._discard(conn)
            return None
        fresh = AnyioConnection(pgconn)  # takes over psycopg's notice and notify callbacks
        fresh._autocommit = True
        fresh.log = conn.log
        fresh.cancel_grace = conn.cancel_grace
        if not self._prepared_statements:
            fresh.prepare_threshold = None
        self._entries[id(fresh)] = self._entries.pop(id(conn))
        # psycopg warns when an open connection outside a pool is collected;
        # the old object was a pool's, and its session lives on in ``fresh``.
        conn._pool = None
        reset = False
        with anyio.move_on_after(_RESET_TIMEOUT, shield=True):
            try:
                if pgconn.transaction_status != _IDLE:
                    await fresh.rollback()
                if self._reset_query:
                    await fresh.execute(self._reset_query)
                reset = True
            except e.Error as exc:
                self._log.warning("could not reset a lent connection, closing it: %s", exc)
        if not (reset and _clean(fresh)):
            self._discard(fresh)
            return None
        return fresh

    def _usable(self, conn: AnyioConnection, *, poll: bool = True) -> bool:
        entry = self._entries.get(id(conn))
        if self._closed or entry is None or entry.expires_at <= anyio.current_time():
            return False
        return _looks_alive(conn) if poll else _clean(conn)

    def _put(self, conn: AnyioConnection) -> None:
        """Hand a healthy connection to the next waiter, or park it idle."""
        if self._closed:
            self._discard(conn)
            return
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.conn = conn
            waiter.event.set()
        else:
            self._entries[id(conn)].idle_since = anyio.current_time()
            self._idle.append(conn)
        self._assign()  # a worker may now be under its share, with a slot to open

    def _next_waiter(self) -> _Waiter | None:
        """The next waiter to serve: other callers first, then a worker under its share."""
        if self._waiters:
            return self._waiters.popleft()
        if self._worker_waiters and self._worker_held < self._worker_max:
            self._worker_held += 1
            return self._worker_waiters.popleft()
        return None

    def _has_waiter(self) -> bool:
        return bool(
            self._waiters or (self._worker_waiters and self._worker_held < self._worker_max)
        )

    def _assign(self) -> None:
        """Serve the waiters that may be served: idle connections first, then
        slots to open new ones. Synchronous: nothing can change meanwhile."""
        while not self._closed and self._has_waiter():
            if self._idle:
                conn = self._idle.pop()
                if not self._usable(conn):
                    self._close_connection(conn)
                    continue
                waiter = self._next_waiter()
                assert waiter is not None
                waiter.conn = conn
            elif self._may_open():
                waiter = self._next_waiter()
                assert waiter is not None
                self._size += 1
                self._opening += 1
                waiter.slot = True
            else:
                return
            waiter.event.set()

    def _discard(self, conn: AnyioConnection) -> None:
        """Close a connection and let a waiter open a replacement."""
        self._close_connection(conn)
        self._assign()

    def _close_connection(self, conn: AnyioConnection) -> None:
        self._entries.pop(id(conn), None)
        conn.pgconn.finish()
        self._size -= 1

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
            # _size drops with each close, so min_conns stay open.
            too_idle = (
                max_idle > 0
                and now - entry.idle_since > max_idle
                and self._size > self._options.min_conns
            )
            if too_idle or not self._usable(conn):
                self._close_connection(conn)
            else:
                keep.append(conn)
        self._idle[:] = keep
        self._assign()
        await anyio.lowlevel.checkpoint()

    async def _fill_to_minimum(self) -> None:
        while not self._closed and self._size < self._options.min_conns:
            self._take_slot(worker=False)
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
        for waiter in (*self._waiters, *self._worker_waiters):
            waiter.event.set()  # woken with nothing: they raise below
        self._waiters.clear()
        self._worker_waiters.clear()

    def statistics(self) -> PoolStatistics:
        """Current counts, for monitoring and tests."""
        return PoolStatistics(
            size=self._size,
            idle=len(self._idle),
            in_use=self._in_use(),
            waiting=len(self._waiters) + len(self._worker_waiters),
            max_size=self._max_size,
            worker_in_use=self._worker_held,
            worker_max_size=self._worker_max,
        )
