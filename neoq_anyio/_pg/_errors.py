"""The one place where psycopg's exceptions become neoq_anyio's.

Code above the driver (``neoq_anyio._postgres``) catches ``DatabaseError``
only; it runs its statements inside ``map_errors``. Errors a handler meets on
its own connection (``current_transaction()``, ``nq.connection()``) stay
psycopg's: that connection is the user's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import psycopg

from neoq_anyio._exceptions import DatabaseError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["map_errors", "translate"]


def translate(exc: psycopg.Error, doing: str, redact: Callable[[str], str]) -> DatabaseError:
    """``DatabaseError("<doing>: <message>")`` for a psycopg error, secrets scrubbed."""
    return DatabaseError(redact(f"{doing}: {exc}"), sqlstate=exc.sqlstate)


@contextmanager
def map_errors(redact: Callable[[str], str], doing: str) -> Iterator[None]:
    """Re-raise psycopg errors as ``DatabaseError``, with the psycopg error as cause."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, doing, redact) from exc
