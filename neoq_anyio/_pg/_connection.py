"""A psycopg ``AsyncConnection`` that waits through AnyIO, so it runs on asyncio and trio.

psycopg's ``AsyncConnection`` does all its socket waiting in one method,
``wait()``, which drives psycopg's non-blocking generators with asyncio's
``add_reader``/``add_writer``; it guards itself with an ``asyncio.Lock`` and
treats only asyncio's ``CancelledError`` as an interruption. No library serves
psycopg on both loops, so this module replaces exactly those three pieces and
keeps everything else (cursors, adapters, transactions) as psycopg ships it:

* ``wait()`` drives the same generators with ``anyio.wait_readable`` /
  ``anyio.wait_writable`` on the connection's socket;
* ``lock`` is an ``anyio.Lock``;
* a cancellation (or KeyboardInterrupt) in the middle of a query cancels the
  query server-side and drains its result under a shielded, bounded scope, so
  the connection is left usable (the transaction, if any, is aborted); if
  that fails, the connection is closed. A connection with a query still
  running is never handed back to a pool.

Connecting uses libpq's blocking ``PQconnectdb`` in a worker thread: pool
refills are rare, and libpq then handles multi-host strings, ``connect_timeout``
and host name resolution exactly as it documents, without asyncio.
"""

from __future__ import annotations

import select
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import psycopg
from psycopg import errors as e
from psycopg import pq
from psycopg.rows import TupleRow, tuple_row
from psycopg.transaction import AsyncTransaction
from psycopg.waiting import Ready, Wait

from neoq_anyio._exceptions import DatabaseError
from neoq_anyio._log import BackendLog, default_log

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from types import TracebackType

    from psycopg.abc import RV, PQGen

__all__ = ["AnyioConnection", "connect"]

_ACTIVE = pq.TransactionStatus.ACTIVE
_BAD = pq.ConnStatus.BAD

# How long a cancelled query may take to acknowledge the server-side cancel
# before the connection is given up and closed.
CANCEL_GRACE = 5.0

_POLL_MASKS = {
    Wait.R: select.POLLIN,
    Wait.W: select.POLLOUT,
    Wait.RW: select.POLLIN | select.POLLOUT,
}


def _ready_now(fileno: int, state: Wait) -> int:
    """The readiness of ``fileno`` for ``state`` right now, as ``Ready`` bits, without blocking."""
    poller = select.poll()
    poller.register(fileno, _POLL_MASKS[state])
    ready = 0
    for _, events in poller.poll(0):
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
            ready |= Ready.R
        if events & select.POLLOUT:
            ready |= Ready.W
    return ready


async def _wait_either(fileno: int) -> int:
    """Wait until ``fileno`` is readable or writable (psycopg's RW state).

    AnyIO has no single wait for both, and trio allows one waiter per
    direction, so two tasks race. Only reached when a large send fills the
    socket buffer, so the task group's cost does not matter.
    """
    result = 0

    async def wait_one(ready: Ready) -> None:
        nonlocal result
        if ready == Ready.R:
            await anyio.wait_readable(fileno)
        else:
            await anyio.wait_writable(fileno)
        result |= ready
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_one, Ready.R)
        tg.start_soon(wait_one, Ready.W)
    return result


async def _drive(gen: PQGen[RV], fileno: int) -> RV:
    """Run one psycopg generator to completion, waiting through AnyIO."""
    try:
        state = next(gen)
        while True:
            if state == Wait.R:
                await anyio.wait_readable(fileno)
                state = gen.send(Ready.R)
            elif state == Wait.W:
                # A socket asked for writing is nearly always writable: poll
                # first, which is much cheaper than a trip through the loop.
                if not _ready_now(fileno, state):
                    await anyio.wait_writable(fileno)
                state = gen.send(Ready.W)
            else:
                ready = _ready_now(fileno, state) or await _wait_either(fileno)
                state = gen.send(ready)
    except StopIteration as stop:
        result: RV = stop.value
        return result


class _ShieldedTransaction(AsyncTransaction):
    """psycopg's transaction block, ending shielded.

    Under level-triggered cancellation (trio, AnyIO cancel scopes) the
    ROLLBACK that ends a cancelled block would itself be cancelled, leaving
    psycopg's bookkeeping inside a transaction that no longer exists; so the
    block's end runs shielded, bounded by ``CANCEL_GRACE``.
    """

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + CANCEL_GRACE
            return await super().__aexit__(exc_type, exc_val, exc_tb)
        log = getattr(self._conn, "log", None) or default_log()
        log.warning("transaction did not end after cancellation: closing connection")
        self._conn.pgconn.finish()
        return False


class AnyioConnection(psycopg.AsyncConnection[TupleRow]):
    """A psycopg ``AsyncConnection`` usable on both asyncio and trio.

    It is a real ``psycopg.AsyncConnection``: cursors, ``transaction()``,
    adapters and row factories work as psycopg documents them. You get one
    from ``nq.connection()`` or, inside a job, from
    ``current_transaction()``; do not build one yourself.

    A cancellation in the middle of a query cancels the query on the server
    and waits (shielded, at most 5 s) for it to stop, so the connection is
    left usable; if it does not stop, the connection is closed.
    """

    __module__ = "neoq_anyio"

    def __init__(self, pgconn: pq.abc.PGconn, row_factory: Any = tuple_row) -> None:
        super().__init__(pgconn, row_factory)
        # psycopg's asyncio.Lock fails under trio as soon as it is contended.
        # fast_acquire: an uncontended acquire does not yield to the loop;
        # the wait on the socket that follows is the checkpoint.
        self.lock = anyio.Lock(fast_acquire=True)  # type: ignore[assignment]
        # Where this connection's own warnings go; a pool points it at the
        # backend's log, so set_logger() covers them too.
        self.log: BackendLog = default_log()

    async def wait(self, gen: PQGen[RV], interval: float = 0.0, timeout: float | None = None) -> RV:
        """Consume a psycopg generator, waiting on the socket through AnyIO.

        Raises ``psycopg.errors._WaitTimeout`` past ``timeout`` seconds, as
        psycopg's own ``wait()`` does (``notifies()`` relies on it).
        """
        fileno = self.pgconn.socket
        try:
            if timeout is None:
                return await _drive(gen, fileno)
            with anyio.move_on_after(timeout):
                return await _drive(gen, fileno)
            if self.pgconn.transaction_status == _ACTIVE:
                await self._cancel_and_drain(gen, fileno)
            raise e._WaitTimeout("wait timeout expired")
        except BaseException as exc:
            if isinstance(exc, Exception):
                raise
            # Cancelled (or KeyboardInterrupt) mid-operation.
            if self.pgconn.transaction_status == _ACTIVE:
                await self._cancel_and_drain(gen, fileno)
            raise

    async def _cancel_and_drain(self, gen: PQGen[Any], fileno: int) -> None:
        """Cancel the running query on the server and consume its outcome.

        Runs shielded and bounded: the caller is being cancelled already, and
        must not leave the connection ACTIVE. On success the connection is
        idle (or in an aborted transaction); otherwise it is closed.
        """
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + CANCEL_GRACE
            try:
                await anyio.to_thread.run_sync(
                    self.pgconn.get_cancel().cancel, abandon_on_cancel=True
                )
                await _drive(gen, fileno)
            except e.QueryCanceled:
                pass  # what a cancelled query answers
            except Exception as exc:
                self.log.warning("query cancellation failed (%s): closing connection", exc)
                self.pgconn.finish()
        if scope.cancelled_caught or self.pgconn.transaction_status == _ACTIVE:
            self.log.warning("query not terminated after cancellation: closing connection")
            self.pgconn.finish()

    @asynccontextmanager
    async def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncIterator[AsyncTransaction]:
        """psycopg's ``transaction()``, whose end survives cancellation (see
        ``_ShieldedTransaction``)."""
        tx = _ShieldedTransaction(self, savepoint_name, force_rollback)
        if self._pipeline:
            async with self.pipeline(), tx, self.pipeline():
                yield tx
        else:
            async with tx:
                yield tx

    async def cancel_safe(self, *, timeout: float = 30.0) -> None:
        """Cancel the current operation on the connection (psycopg's API, without asyncio)."""
        if not self._should_cancel():
            return
        with anyio.fail_after(timeout or None):
            await anyio.to_thread.run_sync(self.pgconn.get_cancel().cancel, abandon_on_cancel=True)


def _connect_blocking(conninfo: str) -> pq.abc.PGconn | str:
    """A connected PGconn, or libpq's error message."""
    pgconn = pq.PGconn.connect(conninfo.encode())
    if pgconn.status == _BAD:
        message = pgconn.get_error_message()
        pgconn.finish()
        return message
    pgconn.nonblocking = 1
    return pgconn


async def connect(
    conninfo: str,
    *,
    autocommit: bool = True,
    redact: Callable[[str], str] = str,
    doing: str = "cannot connect",
) -> AnyioConnection:
    """Open an ``AnyioConnection`` with libpq's own connect run in a worker thread.

    Raises:
        DatabaseError: the server could not be reached or refused us:
            ``"<doing>: <libpq's message>"`` passed through ``redact``, with
            no cause chained (libpq's text may echo connection details).
    """
    pgconn = await anyio.to_thread.run_sync(_connect_blocking, conninfo, abandon_on_cancel=True)
    if isinstance(pgconn, str):
        raise DatabaseError(redact(f"{doing}: {pgconn.strip()}"))
    conn = AnyioConnection(pgconn)
    conn._autocommit = autocommit  # no server round trip: psycopg sends BEGIN lazily
    return conn
