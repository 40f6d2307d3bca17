"""How the backend's sessions are set up: directly, or behind a connection pooler.

A direct connection, or a pooler in session mode, gives each pooled
connection a server session of its own for the connection's whole life. So
the settings are made once per session (``_sql.session_settings``),
psycopg prepares statements on the server, ``LISTEN`` runs on a connection
like the others, and a connection lent to user code is reset with
``RESET_SESSION`` when it comes back.

A transaction pooler (PgBouncer's ``pool_mode = transaction``) runs each
transaction in whichever server session is free: nothing set in a session
lasts, and what is set lands in other clients' transactions. So there the
settings travel with each transaction (``_sql.PerTransaction``), nothing is
prepared unless the pooler keeps prepared statements per client, and there
is no session of ours to reset. ``LISTEN`` cannot work through it at all:
the backend decides where it goes (``listen_connection_string``, or polling).

``plan_sessions`` is the one place that decides, from the options alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from neoq_anyio._pg._pool import RESET_SESSION

from . import _sql

__all__ = ["POOLERS", "Sessions", "plan_sessions"]

POOLERS: Final = ("transaction", "transaction_prepared")
"""The ``pooler`` values of a transaction pooler: with ``"transaction"`` no
statement is prepared on the server; ``"transaction_prepared"`` is for a
pooler that keeps prepared statements per client (PgBouncer 1.22 and later
with ``max_prepared_statements``)."""

_FORGET_PREPARED: Final = b"DEALLOCATE ALL"
"""What a lent connection runs when it comes back through a pooler that keeps
prepared statements per client: a new psycopg connection object names its
statements from ``_pg3_0`` again (PgBouncer 1.22+ understands it)."""


@dataclass(frozen=True, slots=True)
class Sessions:
    """How the backend's connections use their server sessions.

    Attributes:
        pooled: behind a transaction pooler: no session state is relied on.
        setup: run once on each new connection (empty: nothing).
        reset: run on a lent connection when it comes back (empty: nothing).
        prepared_statements: whether psycopg prepares statements on the server.
        per_transaction: the settings each transaction carries instead.
    """

    pooled: bool
    setup: bytes
    reset: bytes
    prepared_statements: bool
    per_transaction: _sql.PerTransaction


def plan_sessions(
    *, pooler: str | None, synchronous_commit: bool, transaction_timeout: float
) -> Sessions:
    """The sessions for ``open_backend``'s ``pooler`` (``None``: our own sessions)."""
    if pooler not in POOLERS:
        setup = _sql.session_settings(
            synchronous_commit=synchronous_commit, transaction_timeout=transaction_timeout
        )
        return Sessions(False, setup, RESET_SESSION, True, _sql.DIRECT)
    prepared = pooler == "transaction_prepared"
    per_transaction = _sql.per_transaction(
        synchronous_commit=synchronous_commit, transaction_timeout=transaction_timeout
    )
    reset = _FORGET_PREPARED if prepared else b""
    return Sessions(True, b"", reset, prepared, per_transaction)
