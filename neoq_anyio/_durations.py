"""Durations: Go's ``time.ParseDuration`` syntax, and option values given in seconds."""

from __future__ import annotations

import math
import numbers
import reprlib
from datetime import timedelta
from typing import Literal, overload

from neoq_anyio._exceptions import ConfigurationError

__all__ = ["DurationSyntaxError", "parse_go_duration", "to_seconds"]

# Nanoseconds per unit, as in Go's time package (both micro signs are accepted).
_UNITS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # MICRO SIGN
    "\u03bcs": 1_000,  # GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_UNIT_HINT = "use ns, us, ms, s, m or h"
_DIGITS = frozenset("0123456789")
# Go's time.Duration is an int64 count of nanoseconds.
_MAX_NS = 2**63 - 1
# Bounded reprs in error messages, long enough for a timedelta.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


class DurationSyntaxError(ValueError):
    """A string is not a valid Go duration.

    Attributes:
        text: The text that failed to parse.
        reason: Why it failed, without the text (for callers that name the option instead).
    """

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"invalid duration {text!r}: {reason}")
        self.text = text
        self.reason = reason


def parse_go_duration(text: str) -> float:
    """Parse a duration written in Go's ``time.ParseDuration`` syntax.

    A duration is an optionally signed sequence of decimal numbers, each with an
    optional fraction and a unit suffix, such as ``"300ms"``, ``"-1.5h"`` or ``"2h45m"``.
    Valid units are ``ns``, ``us`` (or ``µs``/``μs``), ``ms``, ``s``, ``m`` and ``h``.
    A bare ``"0"`` is the only number allowed without a unit.

    Args:
        text: The duration text.

    Returns:
        The duration in seconds (sub-nanosecond fractions are truncated, as in Go).

    Raises:
        DurationSyntaxError: A ``ValueError`` naming ``text`` and the problem.
    """
    sign, body = _split_sign(text)
    if body == "0":
        return 0.0
    if not body:
        raise DurationSyntaxError(text, "empty duration" if not text else "missing number")
    total = 0
    pos = 0
    while pos < len(body):
        nanos, pos = _parse_term(text, body, pos)
        total += nanos
    # int64 nanoseconds: one more on the negative side.
    if total > _MAX_NS + (sign < 0):
        raise DurationSyntaxError(text, "out of range (at most about 292 years)")
    return sign * total / 1_000_000_000


def _split_sign(text: str) -> tuple[int, str]:
    """Split an optional leading ``+`` or ``-`` from ``text``."""
    if text[:1] == "-":
        return -1, text[1:]
    if text[:1] == "+":
        return 1, text[1:]
    return 1, text


def _parse_term(text: str, body: str, pos: int) -> tuple[int, int]:
    """Parse one ``<number><unit>`` term of ``body`` starting at ``pos``.

    Returns:
        The term in nanoseconds and the position after it.
    """
    start = pos
    while pos < len(body) and body[pos] in _DIGITS:
        pos += 1
    whole = body[start:pos]
    fraction = ""
    if pos < len(body) and body[pos] == ".":
        pos += 1
        frac_start = pos
        while pos < len(body) and body[pos] in _DIGITS:
            pos += 1
        fraction = body[frac_start:pos]
    if not whole and not fraction:
        raise DurationSyntaxError(
            text, "expected a number followed by a unit, such as 300ms or 1h30m"
        )
    unit_start = pos
    while pos < len(body) and body[pos] not in _DIGITS and body[pos] != ".":
        pos += 1
    unit = body[unit_start:pos]
    if not unit:
        raise DurationSyntaxError(text, f"missing unit ({_UNIT_HINT})")
    scale = _UNITS.get(unit)
    if scale is None:
        raise DurationSyntaxError(text, f"unknown unit {unit!r} ({_UNIT_HINT})")
    nanos = int(whole or "0") * scale
    if fraction:
        # Exact integer arithmetic, truncating below a nanosecond like Go does.
        nanos += int(fraction) * scale // 10 ** len(fraction)
    return nanos, pos


@overload
def to_seconds(
    value: float | timedelta,
    *,
    name: str,
    allow_zero: bool = ...,
    allow_none: Literal[False] = ...,
) -> float: ...


@overload
def to_seconds(
    value: float | timedelta | None,
    *,
    name: str,
    allow_zero: bool = ...,
    allow_none: bool,
) -> float | None: ...


def to_seconds(
    value: object,
    *,
    name: str,
    allow_zero: bool = True,
    allow_none: bool = False,
) -> float | None:
    """Convert an option given as a number of seconds or a ``timedelta`` to float seconds.

    Args:
        value: The option's value: an ``int``, a ``float``, another real number, a
            ``timedelta`` or (when ``allow_none``) ``None``.
        name: The option's name, used in the error message.
        allow_zero: Whether zero is accepted.
        allow_none: Whether ``None`` is accepted (and returned as ``None``).

    Returns:
        The value in seconds, or ``None`` when ``value`` is ``None`` and that is allowed.

    Raises:
        ConfigurationError: ``value`` is a bool, not a number nor a timedelta, NaN,
            infinite, negative, or zero when ``allow_zero`` is false.
    """
    if value is None and allow_none:
        return None
    seconds = _as_seconds(value)
    if seconds is None or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ConfigurationError(_to_seconds_message(value, name, allow_zero, allow_none))
    return seconds


def _as_seconds(value: object) -> float | None:
    """Return ``value`` in seconds, or ``None`` if it is not a finite number or timedelta."""
    # bool is an int subclass, but True is not a sensible duration.
    if isinstance(value, bool):
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if not isinstance(value, numbers.Real):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return seconds if math.isfinite(seconds) else None


def _to_seconds_message(value: object, name: str, allow_zero: bool, allow_none: bool) -> str:
    """Build the error message of :func:`to_seconds`."""
    kind = "non-negative" if allow_zero else "positive"
    accepted = f"a {kind} number of seconds or a timedelta"
    if allow_none:
        accepted += ", or None"
    got = _REPR.repr(value)
    if isinstance(value, bool):
        got += " (a bool is not a duration)"
    elif not isinstance(value, numbers.Real | timedelta) and value is not None:
        got += f" ({type(value).__name__})"
    return f"{name} must be {accepted}, got {got}"
