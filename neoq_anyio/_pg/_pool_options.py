"""The pool's options, named and defaulted like Go's pgxpool, and their one range check.

A module of their own so the connection-string parser (``_dsn``) can build
them without depending on the pool.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from neoq_anyio._exceptions import ConfigurationError

__all__ = ["PoolOptions", "PoolOptionsError", "default_max_conns"]


def default_max_conns() -> int:
    """Return pgxpool's default pool size: the number of CPUs, at least 4."""
    return max(4, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """Connection pool settings, named and defaulted like Go's pgxpool.

    Durations are in seconds.

    Raises:
        PoolOptionsError: On construction, if a value is out of range or not a number
            (a :class:`ConfigurationError`).
    """

    max_conns: int = field(default_factory=lambda: _DefaultMaxConns(default_max_conns()))
    min_conns: int = 0
    max_conn_lifetime: float = 3600.0
    max_conn_idle_time: float = 1800.0
    health_check_period: float = 60.0
    max_conn_lifetime_jitter: float = 0.0

    def __post_init__(self) -> None:
        _check_pool_options(self)

    @property
    def max_conns_given(self) -> bool:
        """Whether ``max_conns`` was set rather than left at pgxpool's default.

        Only a default size grows to cover the workers (``ConnectionPool.add_workers``):
        a size the user chose is kept, and ``start()`` warns when it is too small.
        """
        return type(self.max_conns) is not _DefaultMaxConns


class _DefaultMaxConns(int):
    """pgxpool's default size, marked as not chosen by the user (``max_conns_given``).

    An ``int`` like any other, so options compare and print as before.
    """

    __slots__ = ()


class PoolOptionsError(ConfigurationError):
    """A :class:`PoolOptions` value is out of range or not a number.

    The message names the field and its value. A caller that read the value from text
    (the connection-string parser) names the option and the text its own way, with
    :attr:`option` and :meth:`reason`.

    Attributes:
        option: The offending field, such as ``"min_conns"``.
    """

    def __init__(self, option: str, value: object, expected: str, reason: str = "") -> None:
        super().__init__(f"{option} must be {expected}, got {value!r}")
        self.option = option
        self._reason = reason or f"must be {expected}"

    def reason(self, prefix: str = "") -> str:
        """Say what is wrong with the value, without quoting it.

        Args:
            prefix: Written before the names of the other options the reason mentions
                (``"pool_"`` for pgxpool's names), as in ``"must not exceed max_conns (4)"``.
        """
        return self._reason.format(prefix=prefix)


# Duration fields, in pgxpool's order, and whether zero is refused too.
_DURATION_FIELDS = (
    ("max_conn_lifetime", False),
    ("max_conn_idle_time", False),
    ("health_check_period", True),
    ("max_conn_lifetime_jitter", False),
)


def _check_pool_options(options: PoolOptions) -> None:
    """Raise :class:`PoolOptionsError` for the first value of ``options`` out of range.

    This is the one range check of the pool options: the connection-string parser only
    turns text into numbers and leaves the ranges to it.
    """
    max_conns, min_conns = options.max_conns, options.min_conns
    if _is_bad_int(max_conns) or max_conns < 1:
        raise PoolOptionsError("max_conns", max_conns, "an integer greater than 0")
    expected = f"an integer from 0 to max_conns ({max_conns})"
    if _is_bad_int(min_conns) or min_conns < 0:
        raise PoolOptionsError(
            "min_conns", min_conns, expected, "must be an integer greater than or equal to 0"
        )
    if min_conns > max_conns:
        raise PoolOptionsError(
            "min_conns", min_conns, expected, f"must not exceed {{prefix}}max_conns ({max_conns})"
        )
    for name, positive in _DURATION_FIELDS:
        value = getattr(options, name)
        expected = f"a {'positive' if positive else 'non-negative'} number of seconds"
        if _is_bad_float(value):
            raise PoolOptionsError(name, value, expected)
        if value < 0 or (positive and value == 0):
            reason = "must be greater than 0" if positive else "must not be negative"
            raise PoolOptionsError(name, value, expected, reason)


def _is_bad_int(value: object) -> bool:
    # bool is an int subclass, but not a count.
    return isinstance(value, bool) or not isinstance(value, int)


def _is_bad_float(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return True
    return not math.isfinite(value)
