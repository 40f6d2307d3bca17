"""The ``neoq-anyio`` command line (also ``python -m neoq_anyio``), built on Click.

Every command takes ``--dsn`` (else the ``NEOQ_DSN`` environment variable).
Usage errors (bad arguments, a missing DSN, a bad ``MODULE:FUNCTION``) exit
with status 2 and one line on stderr; an unknown job id or an action that
cannot apply exits with status 1, in the same style; neither prints a
traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from neoq_anyio._exceptions import NeoqError

from . import _commands, _dashboard, _jobs, _queues  # noqa: F401 - they register their commands
from ._base import Failure, cli

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]

_PROG = "neoq-anyio"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        cli.main(
            args=list(argv) if argv is not None else None, prog_name=_PROG, standalone_mode=False
        )
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        return 1
    except click.UsageError as exc:
        _say(f"error: {exc.format_message()}")
        return 2
    except Failure as exc:
        _say(f"error: {exc}")
        return 1
    except NeoqError as exc:
        # Bad input the library refused (a malformed DSN, an invalid job), or
        # a database failure: one line, no traceback.
        _say(f"error: {type(exc).__name__}: {exc}")
        return 2 if isinstance(exc, ValueError) else 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _say(message: str) -> None:
    click.echo(f"{_PROG}: {message}", err=True)
