"""The one place where psycopg's exceptions become neoq_anyio's.

Code above the driver (``neoq_anyio._postgres``) catches ``DatabaseError``
only; it runs its statements inside ``map_errors``. Errors a handler meets on
its own connection (``current_transaction()``, ``nq.connection()``) stay
psycopg's: that connection is the user's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg

from neoq_anyio._exceptions import DatabaseError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["map_errors", "translate"]


def translate(exc: psycopg.Error, doing: str, redact: Callable[[str], str]) -> DatabaseError:
    """``DatabaseError("<doing>: <message>")`` for a psycopg error, secrets scrubbed."""
    return DatabaseError(redact(f"{doing}: {exc}"), sqlstate=exc.sqlstate)


class map_errors:
    """``with map_errors(redact, doing):`` re-raises psycopg errors as
    ``DatabaseError``, with the psycopg error as cause.

    A class, not ``@contextmanager``: it wraps every statement of the job hot
    path, where a generator-based manager costs several times more.
    """

    __slots__ = ("_doing", "_redact")

    def __init__(self, redact: Callable[[str], str], doing: str) -> None:
        self._redact = redact
        self._doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, psycopg.Error):
            raise translate(exc, self._doing, self._redact) from exc
