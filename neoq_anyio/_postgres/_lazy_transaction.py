"""``current_transaction()`` in lease mode: the job's transaction, opened on first use.

A leased job holds no connection, and most handlers never ask for one. So
``current_transaction()`` hands them this stand-in; its first query borrows a
pooled connection, opens the transaction and locks the job's row under its
lease (``LeaseStore.lock``), and from then on everything goes to that
connection. The worker commits the job's completion in it, so the handler's
writes commit with it, or rolls it back if the run failed or the lease was
lost. ``current_transaction()`` itself stays synchronous, as in transaction
mode, which is why the opening happens at the first awaited call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neoq_anyio._exceptions import NoTransactionError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from types import TracebackType

    from neoq_anyio._pg._connection import AnyioConnection

__all__ = ["LazyTransaction"]


class LazyTransaction:
    """Stands in for the job's connection until its first query opens it.

    ``execute``, ``cursor()`` (its cursor's ``execute``, ``executemany``,
    ``copy`` and ``stream``), ``transaction()`` and ``pipeline()`` open the
    transaction first; any other attribute needs it open already.

    Args:
        open_: opens the transaction and returns its connection; raises
            ``LeaseLostError`` if the lease was lost.
    """

    def __init__(self, open_: Callable[[], Awaitable[AnyioConnection]]) -> None:
        self._open = open_
        self.conn: AnyioConnection | None = None

    async def connection(self) -> AnyioConnection:
        """The job's connection, its transaction open (opened now if need be)."""
        if self.conn is None:
            self.conn = await self._open()
        return self.conn

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        return await (await self.connection()).execute(query, params, **kwargs)

    def cursor(self, *args: Any, **kwargs: Any) -> _LazyCursor:
        return _LazyCursor(self, args, kwargs)

    def transaction(self, *args: Any, **kwargs: Any) -> _Opening:
        return _Opening(self, "transaction", args, kwargs)

    def pipeline(self, *args: Any, **kwargs: Any) -> _Opening:
        return _Opening(self, "pipeline", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        conn = self.__dict__.get("conn")
        if conn is None:
            raise NoTransactionError(
                f"in lease mode the job's transaction opens with its first query: run one "
                f"(await current_transaction().execute(...)) before using .{name}"
            )
        return getattr(conn, name)


class _Opening:
    """``async with lazy.transaction():`` (or ``pipeline()``): opens the job's
    transaction, then enters the connection's own context manager."""

    def __init__(self, lazy: LazyTransaction, method: str, args: Any, kwargs: Any) -> None:
        self._lazy = lazy
        self._call = (method, args, kwargs)
        self._cm: Any = None

    async def __aenter__(self) -> Any:
        conn = await self._lazy.connection()
        method, args, kwargs = self._call
        self._cm = getattr(conn, method)(*args, **kwargs)
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        result: bool | None = await self._cm.__aexit__(exc_type, exc, tb)
        return result


class _LazyCursor:
    """``lazy.cursor()``: a cursor made on the job's connection at its first use."""

    def __init__(self, lazy: LazyTransaction, args: Any, kwargs: Any) -> None:
        self._lazy = lazy
        self._args = args
        self._kwargs = kwargs
        self._cursor: Any = None

    async def _real(self) -> Any:
        if self._cursor is None:
            conn = await self._lazy.connection()
            self._cursor = conn.cursor(*self._args, **self._kwargs)
        return self._cursor

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        await (await self._real()).execute(*args, **kwargs)
        return self

    async def executemany(self, *args: Any, **kwargs: Any) -> None:
        await (await self._real()).executemany(*args, **kwargs)

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for row in (await self._real()).stream(*args, **kwargs):
            yield row

    def copy(self, *args: Any, **kwargs: Any) -> _CursorOpening:
        return _CursorOpening(self, args, kwargs)

    async def __aenter__(self) -> _LazyCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._cursor is not None:
            await self._cursor.close()

    def __getattr__(self, name: str) -> Any:
        cursor = self.__dict__.get("_cursor")
        if cursor is None:
            raise NoTransactionError(
                f"in lease mode the job's transaction opens with its first query: "
                f"execute one on this cursor before using .{name}"
            )
        return getattr(cursor, name)


class _CursorOpening:
    """``async with lazy_cursor.copy(...)``: opens the transaction first."""

    def __init__(self, cursor: _LazyCursor, args: Any, kwargs: Any) -> None:
        self._lazy_cursor = cursor
        self._call = (args, kwargs)
        self._cm: Any = None

    async def __aenter__(self) -> Any:
        real = await self._lazy_cursor._real()
        args, kwargs = self._call
        self._cm = real.copy(*args, **kwargs)
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        result: bool | None = await self._cm.__aexit__(*exc)
        return result
