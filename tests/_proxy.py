"""A TCP proxy in front of the test PostgreSQL, for real network faults.

Tests that need a network fault put this proxy between the code under test
and the server, then change what it does to every link (each client
connection and its connection to the server), current and future::

    async with open_proxy(server_dsn) as proxy:
        conn = await connect(proxy.conninfo(dsn))   # through the proxy
        proxy.silence()       # a black hole: sockets stay open, nothing is forwarded
        proxy.pass_through()  # the partition heals: held bytes flow on, in order
        proxy.delay(0.2)      # each chunk arrives 0.2 s late
        proxy.cut()           # every current link is reset; new ones are accepted

Faults are real sockets, nothing is mocked: while silenced the proxy keeps
accepting connections and reading what arrives (the kernel acknowledges it,
as a router in a partition would), but holds it; nothing the client sends or
the server answers goes through, not even a close.

The proxy runs in a task group of the test's own event loop (asyncio or
trio). It listens on 127.0.0.1 and reaches the server over TCP or its Unix
socket, as the DSN says. Leaving the block closes every link and ends every
task; an exception from the block comes out as it is, not in a group.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import deque
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream, SocketAttribute
from psycopg.conninfo import conninfo_to_dict, make_conninfo

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from anyio.abc import SocketStream, TaskGroup

__all__ = ["Proxy", "open_proxy"]

_CHUNK = 65536
# Errors that mean "this side of the link is gone".
_GONE = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)


class Proxy:
    """What the proxy does to its links; get one from :func:`open_proxy`.

    Attributes:
        host: the address it listens on (``127.0.0.1``).
        port: the port it listens on.
        accepted: how many links it has accepted so far (silenced or not), so a
            test can see a client connect again.
    """

    def __init__(self, port: int, upstream: Callable[[], Awaitable[ByteStream]]) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.accepted = 0
        self._upstream = upstream
        self._links: set[_Link] = set()
        self._silenced = False
        self._delay = 0.0
        self._changed = anyio.Event()

    @property
    def links(self) -> int:
        """How many links are open now."""
        return len(self._links)

    def conninfo(self, dsn: str, **params: str) -> str:
        """``dsn`` as a libpq key=value string leading through the proxy.

        Args:
            dsn: the connection string of the database to reach.
            **params: libpq parameters to add or replace (e.g. ``connect_timeout="2"``).
        """
        merged = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if k != "hostaddr"}
        # The server sees a plain connection from the proxy: no TLS or GSSAPI to negotiate.
        merged.update(host=self.host, port=str(self.port), sslmode="disable", gssencmode="disable")
        merged.update(params)
        return make_conninfo("", **merged)

    def pass_through(self) -> None:
        """Forward everything at once (the default); held bytes flow on, in order."""
        self._silenced = False
        self._delay = 0.0
        self._wake()

    def delay(self, seconds: float) -> None:
        """Forward every chunk ``seconds`` after it arrived, in order, both ways."""
        self._silenced = False
        self._delay = seconds
        self._wake()

    def silence(self) -> None:
        """Forward nothing, both ways, keeping every socket open (a black hole).

        New links are still accepted, and silenced too.
        """
        self._silenced = True
        self._wake()

    def cut(self) -> None:
        """Reset every current link now (the client sees the connection drop)."""
        for link in list(self._links):
            link.reset()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _open_gate(self, since: float) -> None:
        """Wait until a chunk that arrived at ``since`` may be forwarded."""
        while True:
            if self._silenced:
                await self._changed.wait()
                continue
            due = since + self._delay
            if anyio.current_time() >= due:
                return
            with anyio.move_on_after(due - anyio.current_time()):
                await self._changed.wait()  # the mode may change meanwhile

    async def _serve(self, client: SocketStream) -> None:
        self.accepted += 1
        async with client:
            try:
                upstream = await self._upstream()
            except OSError:
                return  # the server is gone: drop the client
            async with upstream, anyio.create_task_group() as tg:
                link = _Link(tg.cancel_scope, client)
                self._links.add(link)
                try:
                    self._start_direction(tg, client, upstream)
                    self._start_direction(tg, upstream, client)
                    await anyio.sleep_forever()
                finally:
                    self._links.discard(link)

    def _start_direction(self, tg: TaskGroup, source: ByteStream, sink: ByteStream) -> None:
        chunks = _Chunks()
        tg.start_soon(_read, source, chunks)
        tg.start_soon(self._write, chunks, sink, tg.cancel_scope)

    async def _write(self, chunks: _Chunks, sink: ByteStream, link: anyio.CancelScope) -> None:
        while True:
            since, data = await chunks.get()
            await self._open_gate(since)
            if data is None:
                break  # the other side closed: close this link, when allowed
            try:
                await sink.send(data)
            except _GONE:
                break
        link.cancel()


class _Chunks:
    """What one direction of a link has read and not yet forwarded, with arrival times."""

    def __init__(self) -> None:
        self._items: deque[tuple[float, bytes | None]] = deque()
        self._arrived = anyio.Event()

    def put(self, data: bytes | None) -> None:
        self._items.append((anyio.current_time(), data))
        self._arrived.set()

    async def get(self) -> tuple[float, bytes | None]:
        while not self._items:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return self._items.popleft()


async def _read(source: ByteStream, chunks: _Chunks) -> None:
    """Read ``source`` into ``chunks`` as fast as it comes; ``None`` marks its end."""
    while True:
        try:
            data = await source.receive(_CHUNK)
        except _GONE:
            chunks.put(None)
            return
        chunks.put(data)


class _Link:
    __slots__ = ("client", "scope")

    def __init__(self, scope: anyio.CancelScope, client: SocketStream) -> None:
        self.scope = scope
        self.client = client

    def reset(self) -> None:
        """Close the link, the client's side with a TCP reset."""
        raw = self.client.extra(SocketAttribute.raw_socket)
        with suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.scope.cancel()


class _UnixStream(ByteStream):
    """A Unix socket read and written through ``anyio.wait_readable``/``wait_writable``.

    Not ``anyio.connect_unix()``: on asyncio, its stream can run a read callback
    on a future already cancelled when a receive is cancelled just as data
    arrives (an ``InvalidStateError`` the loop reports), which a proxy closing
    busy links hits.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    async def connect(cls, path: str) -> _UnixStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                sock.connect(path)
            except BlockingIOError:
                await anyio.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error)) from None
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def receive(self, max_bytes: int = _CHUNK) -> bytes:
        while True:
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
                continue
            view = view[sent:]

    async def send_eof(self) -> None:
        self._sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        anyio.notify_closing(self._sock)
        self._sock.close()


def _upstream_of(dsn: str) -> Callable[[], Awaitable[ByteStream]]:
    """How to reach the server ``dsn`` names: its first host, over TCP or a Unix socket."""
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    host = (
        params.get("hostaddr") or params.get("host") or os.environ.get("PGHOST") or "/tmp"
    ).split(",")[0]
    port = int((params.get("port") or os.environ.get("PGPORT") or "5432").split(",")[0] or 5432)
    if host.startswith("/"):
        path = f"{host}/.s.PGSQL.{port}"

        async def unix() -> ByteStream:
            return await _UnixStream.connect(path)

        return unix

    async def tcp() -> ByteStream:
        return await anyio.connect_tcp(host, port)

    return tcp


@asynccontextmanager
async def open_proxy(dsn: str) -> AsyncIterator[Proxy]:
    """Run a proxy to the server of ``dsn`` (a URL or key=value string) for the block.

    Yields:
        The :class:`Proxy`, forwarding everything until told otherwise.
    """
    upstream = _upstream_of(dsn)
    failure: BaseException | None = None
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        proxy = Proxy(listener.extra(SocketAttribute.local_port), upstream)
        tg.start_soon(listener.serve, proxy._serve, tg)
        try:
            yield proxy
        except BaseException as exc:
            failure = exc  # re-raised below, outside the task group, so not wrapped
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
