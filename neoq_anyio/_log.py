"""The backend's one logger: swapped by ``set_logger``, scrubbing secrets.

Every component of a backend (pool, connections, listener, schedulers,
workers, cron) logs through the same ``BackendLog`` object, so
``set_logger()`` reaches them all by changing one attribute, and every
message passes through the connection string's redaction once, here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["BackendLog", "default_log"]


def _unchanged(text: str) -> str:
    return text


class BackendLog:
    """Formats, redacts and forwards records to the current ``logger``.

    Args:
        logger: where records go; replace it to redirect every component.
        redact: scrubs secrets (the connection string's password) from text,
            whether it ends up in a log record or in an error message.
    """

    __slots__ = ("logger", "redact")

    def __init__(self, logger: logging.Logger, redact: Callable[[str], str] = _unchanged) -> None:
        self.logger = logger
        self.redact = redact

    def debug(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._log(logging.DEBUG, msg, args, **kwargs)

    def info(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._log(logging.INFO, msg, args, **kwargs)

    def warning(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._log(logging.WARNING, msg, args, **kwargs)

    def error(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._log(logging.ERROR, msg, args, **kwargs)

    def exception(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._log(logging.ERROR, msg, args, exc_info=True, **kwargs)

    def _log(
        self,
        level: int,
        msg: str,
        args: tuple[object, ...],
        *,
        exc_info: Any = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        # Formatted here, not by logging, so the secret is scrubbed from the
        # arguments too (exception texts often quote the connection string).
        text = self.redact(msg % args if args else msg)
        logger.log(level, text, exc_info=exc_info, extra=extra, stacklevel=3)


def default_log() -> BackendLog:
    """A log for components used without a backend (tests, the driver alone)."""
    return BackendLog(logging.getLogger("neoq_anyio"))
