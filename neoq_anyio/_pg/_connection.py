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

The event loop never waits on libpq. psycopg's binary build holds the GIL
inside libpq's blocking calls, so a blocking connect or cancel, even in a
worker thread, freezes every task for as long as the server takes to answer.
So connecting polls libpq's non-blocking connect (``PQconnectStart`` /
``PQconnectPoll``) with AnyIO waits, host names are resolved with
``anyio.getaddrinfo``, and a query is cancelled with libpq 17's non-blocking
cancel API. ``connect()`` keeps libpq's documented behaviour: the hosts of a
multi-host string are tried in order (each address a host name resolves to
in turn), each attempt bounded by ``connect_timeout``.
"""

from __future__ import annotations

import math
import os
import random
import re
import select
import socket
from contextlib import asynccontextmanager
from functools import cache
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import psycopg
from psycopg import errors as e
from psycopg import generators, pq
from psycopg._conninfo_utils import get_param, get_param_def, is_ip_address, split_attempts
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow, tuple_row
from psycopg.transaction import AsyncTransaction
from psycopg.waiting import Ready, Wait

from neoq_anyio._exceptions import DatabaseError
from neoq_anyio._log import BackendLog, default_log

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping
    from types import TracebackType

    from psycopg.abc import RV, PQGen, PQGenConn

__all__ = ["CANCEL_GRACE", "LIBPQ_DEFAULTS", "AnyioConnection", "connect"]

_ACTIVE = pq.TransactionStatus.ACTIVE
_POLL_OK = pq.PollingStatus.OK
_POLL_READING = pq.PollingStatus.READING
_POLL_WRITING = pq.PollingStatus.WRITING

# How long a cancelled query may take to acknowledge the server-side cancel
# before the connection is given up and closed (``AnyioConnection.cancel_grace``).
CANCEL_GRACE = 5.0

#: libpq parameters ``connect()`` adds when neither the connection string nor
#: the environment (``PGCONNECT_TIMEOUT``) sets them, so that a server that
#: stops answering is noticed in about a minute rather than after the kernel's
#: two hours: ``connect_timeout`` bounds each connection attempt (seconds);
#: TCP keepalives probe an idle link after 30 s, every 10 s, and give up after
#: 3 unanswered probes; ``tcp_user_timeout`` (milliseconds) drops a link whose
#: sent data stays unacknowledged for 60 s. Unix-domain sockets ignore all but
#: ``connect_timeout``.
LIBPQ_DEFAULTS: Final[Mapping[str, str]] = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
    # Tells neoq_anyio's sessions apart in pg_stat_activity (PGAPPNAME or the
    # connection string's own application_name wins).
    "application_name": "neoq_anyio",
}

# libpq 17 brought a cancel request that does not block (PQcancelStart/Poll).
_NONBLOCKING_CANCEL = psycopg.capabilities.has_cancel_safe()

# libpq parses integer options with strtol(): optional spaces and sign, digits.
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")

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


async def _drive_conn(gen: PQGenConn[RV]) -> RV:
    """Run a psycopg generator that names its socket at each wait (connect, cancel)."""
    try:
        fileno, state = next(gen)
        while True:
            if state == Wait.R:
                await anyio.wait_readable(fileno)
                ready: int = Ready.R
            elif state == Wait.W:
                await anyio.wait_writable(fileno)
                ready = Ready.W
            else:
                ready = _ready_now(fileno, state) or await _wait_either(fileno)
            fileno, state = gen.send(ready)
    except StopIteration as stop:
        result: RV = stop.value
        return result


def _grace_of(conn: psycopg.AsyncConnection[Any]) -> float:
    grace: float = getattr(conn, "cancel_grace", CANCEL_GRACE)
    return grace


class _ShieldedTransaction(AsyncTransaction):
    """psycopg's transaction block, whose end survives cancellation.

    A block left by a cancellation (or KeyboardInterrupt) ends with a
    ROLLBACK. Under level-triggered cancellation (trio, AnyIO cancel scopes)
    that ROLLBACK would itself be cancelled, leaving psycopg's bookkeeping
    inside a transaction that no longer exists; so it runs shielded, bounded
    by the connection's ``cancel_grace``, after which the connection is
    closed (the server then rolls back).

    A block left normally ends with a COMMIT, and one left by an error with a
    ROLLBACK, exactly as in psycopg: unshielded and unbounded, because a
    COMMIT takes as long as the server needs, and giving up on one would lose
    rows the caller believes committed. If a cancellation interrupts it, the
    cancellation propagates: the caller never mistakes an unfinished COMMIT
    for a done one.
    """

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        if exc_val is not None and not isinstance(exc_val, Exception):
            return await self._end_cancelled(exc_type, exc_val, exc_tb)
        try:
            return await super().__aexit__(exc_type, exc_val, exc_tb)
        except BaseException as exc:
            if isinstance(exc, Exception) or self.status != self.Status.ACTIVE:
                raise
            # Cancelled before the COMMIT or ROLLBACK was sent (waiting for
            # the connection's lock): psycopg still counts the block as open,
            # so end it as a cancelled one, then let the cancellation through.
            await self._end_cancelled(type(exc), exc, exc.__traceback__)
            raise

    async def _end_cancelled(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + _grace_of(self._conn)
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
        # Seconds a cancelled query (or a cancelled transaction block's
        # ROLLBACK) may take to stop before the connection is closed instead;
        # 0 closes it at once, for connections cheaper to replace than to
        # wait for (the listener's).
        self.cancel_grace: float = CANCEL_GRACE

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

        Runs shielded and bounded by ``cancel_grace``: the caller is being
        cancelled already, and must not leave the connection ACTIVE. On
        success the connection is idle (or in an aborted transaction);
        otherwise it is closed.
        """
        if self.cancel_grace <= 0:
            self.log.debug("query interrupted: closing connection (no cancel grace)")
            self.pgconn.finish()
            return
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self.cancel_grace
            try:
                await self._request_cancel()
                await _drive(gen, fileno)
            except e.QueryCanceled:
                pass  # what a cancelled query answers
            except Exception as exc:
                self.log.warning("query cancellation failed (%s): closing connection", exc)
                self.pgconn.finish()
        if scope.cancelled_caught or self.pgconn.transaction_status == _ACTIVE:
            self.log.warning("query not terminated after cancellation: closing connection")
            self.pgconn.finish()

    async def _request_cancel(self) -> None:
        """Ask the server to cancel the running query, waiting through AnyIO.

        Raises:
            psycopg.OperationalError: the cancel request could not be sent.
        """
        if not _NONBLOCKING_CANCEL:
            # libpq before 17 has only the blocking PQcancel(): run it in a
            # thread. psycopg's binary build holds the GIL meanwhile, so the
            # loop stalls until the server answers; libpq 17+ avoids this.
            cancel = self.pgconn.get_cancel()
            await anyio.to_thread.run_sync(cancel.cancel, abandon_on_cancel=True)
            return
        cancel_conn = self.pgconn.cancel_conn()
        try:
            cancel_conn.start()
            await _drive_conn(generators.cancel(cancel_conn))
        finally:
            cancel_conn.finish()

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
        """Cancel the current operation on the connection (psycopg's API, without asyncio).

        Raises:
            psycopg.errors.CancellationTimeout: the server did not acknowledge
                the cancel request within ``timeout`` seconds.
            psycopg.OperationalError: the cancel request could not be sent.
        """
        if not self._should_cancel():
            return
        with anyio.move_on_after(timeout or math.inf) as scope:
            await self._request_cancel()
        if scope.cancelled_caught:
            raise e.CancellationTimeout("cancellation timeout expired")


# -- connecting ------------------------------------------------------------------------


class _AttemptFailed(Exception):
    """One connection attempt failed; the message is libpq's (or says so)."""


@cache
def _libpq_keywords() -> frozenset[str]:
    return frozenset(option.keyword.decode() for option in pq.Conninfo.get_defaults())


def _with_libpq_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` plus ``LIBPQ_DEFAULTS`` for the parameters nobody set.

    A parameter counts as set when the connection string names it or its
    environment variable exists (libpq reads it even when empty). A service
    (``service=`` or ``PGSERVICE``) may set any of them in its file, which
    libpq ranks below the connection string, so nothing is added then.
    """
    if "service" in params or "PGSERVICE" in os.environ:
        return params
    merged = dict(params)
    for key, value in LIBPQ_DEFAULTS.items():
        if key in params or key not in _libpq_keywords():
            continue
        definition = get_param_def(key)
        if definition is not None and definition.envvar and definition.envvar in os.environ:
            continue
        merged[key] = value
    return merged


async def _plan_attempts(params: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The connection attempts libpq would make, in order, host names resolved.

    psycopg's ``conninfo_attempts_async`` with ``anyio.getaddrinfo`` in place
    of asyncio's: one attempt per host of a multi-host string, and one per
    address a host name resolves to. Returns the attempts and the errors of
    host names that did not resolve.

    Raises:
        psycopg.OperationalError: the host, hostaddr and port lists do not match.
    """
    prefer_standby = get_param(params, "target_session_attrs") == "prefer-standby"
    if prefer_standby:
        params = {k: v for k, v in params.items() if k != "target_session_attrs"}
    attempts: list[dict[str, Any]] = []
    failures: list[str] = []
    for attempt in split_attempts(params):
        try:
            attempts += await _resolve(attempt)
        except OSError as exc:
            host = get_param(attempt, "host")
            reason = exc.strerror or str(exc)
            failures.append(f'could not translate host name "{host}" to address: {reason}')
    if get_param(params, "load_balance_hosts") == "random":
        random.shuffle(attempts)
    if prefer_standby:
        # First every host as a standby, then any host.
        attempts = [{**a, "target_session_attrs": "standby"} for a in attempts] + attempts
    return attempts, failures


async def _resolve(attempt: dict[str, Any]) -> list[dict[str, Any]]:
    """One attempt per address of the attempt's host name (through AnyIO)."""
    host = get_param(attempt, "host")
    if not host or host.startswith("/") or host[1:2] == ":" or get_param(attempt, "hostaddr"):
        return [attempt]  # a Unix socket, libpq's default, or already an address
    if is_ip_address(host):
        return [{**attempt, "hostaddr": host}]
    port = get_param(attempt, "port")
    if not port:
        definition = get_param_def("port")
        port = (definition.compiled if definition else None) or "5432"
    found = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    # The host stays: libpq still needs it for TLS checks and the password file.
    return [{**attempt, "hostaddr": str(sockaddr[0])} for *_, sockaddr in found]


def _timeout_of(pgconn: pq.abc.PGconn) -> float:
    """The attempt's ``connect_timeout`` as libpq reads it (``math.inf``: none).

    Read from the connection itself, so values from the environment and from
    a service file count. Zero or negative waits for ever, as in libpq; other
    values are whole seconds (the bundled libpq 18 no longer rounds 1 up to 2).
    """
    text = next(
        (o.val.decode() for o in pgconn.info if o.keyword == b"connect_timeout" and o.val), None
    )
    if text is None:
        return math.inf
    if not _INTEGER.fullmatch(text):
        raise _AttemptFailed(
            f'invalid integer value "{text}" for connection option "connect_timeout"'
        )
    timeout = int(text)
    return math.inf if timeout <= 0 else timeout


def _describe(attempt: Mapping[str, Any]) -> str:
    """Name the attempt's server as libpq's messages do."""
    host = get_param(attempt, "host")
    address = get_param(attempt, "hostaddr")
    port = get_param(attempt, "port")
    if not address and (not host or host.startswith("/")):
        where = f'on socket "{host}/.s.PGSQL.{port or 5432}"' if host else "on the default socket"
        return f"connection to server {where}"
    where = f'"{host or address}"' + (f" ({address})" if host and address != host else "")
    return f"connection to server at {where}" + (f", port {port}" if port else "")


async def _connect_once(attempt: dict[str, Any]) -> pq.abc.PGconn:
    """Run one libpq connection attempt, polling its socket through AnyIO.

    Raises:
        _AttemptFailed: libpq gave up, or ``connect_timeout`` expired.
    """
    pgconn = pq.PGconn.connect_start(make_conninfo("", **attempt).encode())
    try:
        timeout = _timeout_of(pgconn)
        with anyio.move_on_after(timeout) as scope:
            while True:
                # The socket can change between polls (e.g. a retry without TLS).
                status = pgconn.connect_poll()
                if status == _POLL_OK:
                    break
                if status == _POLL_READING:
                    await anyio.wait_readable(pgconn.socket)
                elif status == _POLL_WRITING:
                    await anyio.wait_writable(pgconn.socket)
                else:
                    raise _AttemptFailed(pgconn.get_error_message() or "connection failed")
        if scope.cancelled_caught:
            raise _AttemptFailed(f"{_describe(attempt)} failed: timeout expired")
    except BaseException:
        pgconn.finish()
        raise
    pgconn.nonblocking = 1
    return pgconn


async def connect(
    conninfo: str,
    *,
    autocommit: bool = True,
    redact: Callable[[str], str] = str,
    doing: str = "cannot connect",
) -> AnyioConnection:
    """Open an ``AnyioConnection``, never blocking the event loop.

    Host names are resolved through AnyIO and libpq's non-blocking connect is
    polled through AnyIO. As libpq documents, the hosts of a multi-host
    string are tried in order (``load_balance_hosts=random`` shuffles them,
    ``target_session_attrs`` is honoured), each address a host name resolves
    to in turn, and each attempt is bounded by ``connect_timeout``. Parameters
    the string does not set are taken from ``LIBPQ_DEFAULTS``: a 10 s
    ``connect_timeout``, TCP keepalives (30 s idle, every 10 s, 3 probes) and
    a 60 s ``tcp_user_timeout``.

    Raises:
        DatabaseError: the server could not be reached or refused us:
            ``"<doing>: <libpq's message>"`` (one line per failed attempt)
            passed through ``redact``, with no cause chained (libpq's text may
            echo connection details).
    """
    attempts: list[dict[str, Any]] = []
    try:
        params = _with_libpq_defaults(conninfo_to_dict(conninfo))
    except psycopg.Error:
        # libpq's parse errors may quote any part of the string, password included.
        failures = ["the connection string is invalid"]
    else:
        try:
            attempts, failures = await _plan_attempts(params)
        except psycopg.Error as exc:
            failures = [str(exc)]  # host, hostaddr and port counts that do not match
    pgconn: pq.abc.PGconn | None = None
    for attempt in attempts:
        try:
            pgconn = await _connect_once(attempt)
        except _AttemptFailed as exc:
            failures.append(str(exc).strip())
            continue
        break
    if pgconn is None:
        # Raised outside any except block: no chained exception carries libpq's text.
        reasons = "\n".join(failures) or "no host to connect to"
        raise DatabaseError(redact(f"{doing}: {reasons}"))
    conn = AnyioConnection(pgconn)
    conn._autocommit = autocommit  # no server round trip: psycopg sends BEGIN lazily
    return conn
