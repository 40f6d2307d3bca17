"""Payload encoding and Go neoq's job fingerprint.

Go neoq fingerprints a job as ``md5(queue + json.Marshal(payload))``. Go's
encoder sorts object keys, writes no spaces, escapes ``<``, ``>``, ``&``,
U+2028 and U+2029, and writes floats in their shortest form without a
fraction when integral (``1`` for 1.0, ``1e+21`` past 1e21). Matching it
lets Go and Python producers deduplicate against each other.

PostgreSQL's ``jsonb`` cannot hold NUL in a string (``\\u0000``), and no
UTF-8 text can hold a lone surrogate, so payloads with either are refused
here, before either backend stores anything. The check looks at the encoded
text first and walks the payload only to name the culprit, so valid payloads
cost one substring search, and are encoded and fingerprinted as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
from typing import Any

from ._exceptions import InvalidJobError

__all__ = ["encode_payload"]

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_GO_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_KEY_REPR = reprlib.Repr()
_KEY_REPR.maxstring = 40
_encode = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def _shortest_digits(magnitude: float) -> tuple[str, int]:
    """Shortest round-tripping decimal digits of a positive float: ``int(d) * 10**e``."""
    mantissa, _, exponent = repr(magnitude).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    exp = int(exponent or 0) - len(fraction)
    stripped = digits.rstrip("0")
    return stripped, exp + len(digits) - len(stripped)


def _go_float(value: float) -> str:
    """Format a float as Go's encoding/json does (strconv shortest, 'f' or 'e')."""
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    digits, exp = _shortest_digits(abs(value))
    if abs(value) < 1e-6 or abs(value) >= 1e21:
        mantissa = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
        e10 = exp + len(digits) - 1
        # Go writes at least two exponent digits, then trims "e-07" to "e-7".
        exponent = f"-{-e10}" if e10 < 0 else f"+{e10:02d}"
        return f"{sign}{mantissa}e{exponent}"
    if exp >= 0:
        return sign + digits + "0" * exp
    point = len(digits) + exp
    if point > 0:
        return f"{sign}{digits[:point]}.{digits[point:]}"
    return f"{sign}0.{'0' * -point}{digits}"


def _go_json(value: Any) -> str:
    """Go-compatible compact JSON for the fingerprint (slow path: payloads with floats)."""
    if isinstance(value, dict):
        items = sorted((str(k), v) for k, v in value.items())
        return "{" + ",".join(f"{_encode(k)}:{_go_json(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_go_json(v) for v in value) + "]"
    if isinstance(value, float):
        return _go_float(value)
    return _encode(value)


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_float(v) for v in value)
    return False


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains NUL (\\u0000), which PostgreSQL's jsonb cannot store"
    if _SURROGATE_RE.search(text):
        return "contains a lone surrogate, which is not valid Unicode"
    return None


def _find_bad_string(value: Any, path: str) -> str | None:
    """Where in ``value`` a string PostgreSQL cannot store is, and why; None if nowhere."""
    if isinstance(value, str):
        problem = _string_problem(value)
        return None if problem is None else f"the string at {path} {problem}"
    if isinstance(value, dict):
        for key, item in value.items():
            step = f"{path}[{_KEY_REPR.repr(key)}]"
            if isinstance(key, str) and (problem := _string_problem(key)) is not None:
                return f"the key at {step} {problem}"
            if (found := _find_bad_string(item, step)) is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if (found := _find_bad_string(item, f"{path}[{index}]")) is not None:
                return found
    return None


def _check_strings(payload: Any, text: str) -> None:
    """Refuse a payload with a string PostgreSQL cannot store, naming its key path.

    ``text`` is the payload's JSON: it holds ``\\u0000`` for each NUL and
    the lone surrogates as they are, so a valid payload is walked only when
    a string holds the six characters ``\\u0000`` themselves.
    """
    if "\\u0000" not in text and (text.isascii() or not _SURROGATE_RE.search(text)):
        return
    found = _find_bad_string(payload, "payload")
    if found is not None:
        raise InvalidJobError(found)


def encode_payload(queue: str, payload: dict[str, Any] | None) -> tuple[str | None, str]:
    """Encode a payload for the database and compute its Go neoq fingerprint.

    Returns:
        ``(json_text, fingerprint)``; ``json_text`` is ``None`` for a ``None``
        payload (stored as SQL NULL, as Go neoq stores a nil map).

    Raises:
        InvalidJobError: the payload cannot be encoded as JSON (a set, bytes,
            NaN, an object...), or one of its strings, key or value, holds
            NUL or a lone surrogate (the message gives its key path, such as
            ``payload['user']['tags'][2]``).
    """
    try:
        text = _encode(payload)
    except (TypeError, ValueError) as exc:
        raise InvalidJobError(f"the payload is not JSON-serialisable: {exc}") from None
    _check_strings(payload, text)
    go_text = _go_json(payload) if _has_float(payload) else text
    if _GO_ESCAPE_RE.search(go_text):
        go_text = _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group()], go_text)
    fingerprint = hashlib.md5((queue + go_text).encode(), usedforsecurity=False).hexdigest()
    return (None if payload is None else text), fingerprint
