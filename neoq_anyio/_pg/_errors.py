"""The one place where psycopg's exceptions become neoq_anyio's."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import psycopg

from neoq_anyio._exceptions import DatabaseError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["map_errors"]


@contextmanager
def map_errors(redact: Callable[[str], str], doing: str) -> Iterator[None]:
    """Re-raise psycopg errors as ``DatabaseError("<doing>: <message>")``, secrets scrubbed."""
    try:
        yield
    except psycopg.Error as exc:
        raise DatabaseError(redact(f"{doing}: {exc}")) from exc
