"""Connection strings: libpq URLs or key=value DSNs carrying Go neoq's pgxpool options.

Users write the same connection strings as with Go neoq: a ``postgres://`` or
``postgresql://`` URL, or a libpq key=value DSN, optionally carrying pgxpool's
``pool_*`` options. :func:`parse_connection_string` takes the pool options out (libpq
rejects unknown options), validates the rest with libpq itself and returns
:class:`ConnectionSettings`.

Errors never contain the password: libpq's messages often quote the whole string or
the offending token, so only a few messages known to name just a key are passed on,
and exceptions are raised outside ``except`` blocks so that no chained exception
carries the original text either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from neoq_anyio._durations import DurationSyntaxError, parse_go_duration
from neoq_anyio._exceptions import ConnectionStringError

from ._pool_options import PoolOptions, PoolOptionsError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "POOL_OPTION_NAMES",
    "ConnectionSettings",
    "parse_connection_string",
]

#: pgxpool's options, accepted in a URL query or as DSN keys and removed before libpq.
POOL_OPTION_NAMES = (
    "pool_max_conns",
    "pool_min_conns",
    "pool_max_conn_lifetime",
    "pool_max_conn_idle_time",
    "pool_health_check_period",
    "pool_max_conn_lifetime_jitter",
)

# libpq options whose values must never appear in an error message.
_SECRET_KEYS = frozenset(
    {"password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key"}
)
_SCHEMES = ("postgres", "postgresql")
_URL_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
# libpq splits on C isspace(), not on Python's wider notion of whitespace.
_SPACE = frozenset(" \t\n\r\f\v")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PORT = re.compile(r"[0-9]{1,5}")
_POOL_COUNTS = ("pool_max_conns", "pool_min_conns")
_DIGITS = re.compile(r"[0-9]+")
_INT32_MAX = 2**31 - 1
_REDACTED = "********"
_KEYVALUE_HINT = "check quoting and key=value pairs"

# libpq messages that quote only an option name, never a value: safe to pass on.
_SAFE_LIBPQ_MESSAGES = (
    re.compile(r'invalid connection option "(?P<name>[^"]*)"'),
    re.compile(r'invalid URI query parameter: "(?P<name>[^"]*)"'),
    re.compile(r'extra key/value separator "=" in URI query parameter: "(?P<name>[^"]*)"'),
)


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """A parsed connection string.

    Attributes:
        conninfo: A libpq key=value connection string, pool options removed. It contains
            the password: never log it, log :meth:`describe` instead.
        pool: The pool options found in the connection string, or pgxpool's defaults.
        password: The password, if the connection string has one (used by :meth:`redact`).
    """

    conninfo: str = field(repr=False)
    pool: PoolOptions
    password: str | None = field(repr=False)

    def __repr__(self) -> str:
        try:
            summary = self.describe()
        except ConnectionStringError:
            summary = "<invalid conninfo>"
        return f"ConnectionSettings({summary!r}, pool={self.pool!r})"

    def redact(self, text: str) -> str:
        """Replace every occurrence of the password in ``text`` with ``********``.

        The raw password is replaced, and so are its percent-encoded and backslash-escaped
        forms, as they may appear in a URL or in :attr:`conninfo`.

        Args:
            text: Any text, such as an error message.

        Returns:
            ``text`` without the password.
        """
        if not self.password:
            return text
        # One pass, so a replacement is never itself searched again.
        return _secret_pattern(self.password).sub(_REDACTED, text)

    def describe(self) -> str:
        """Return a summary safe for logs and errors, such as ``user=app host=db dbname=app``.

        Lists the user, host, port and database name when present, never the password.
        """
        params = self._params()
        parts = [
            f"{key}={_quote_value(params[key])}"
            for key in ("user", "host", "port", "dbname")
            if key in params
        ]
        return " ".join(parts) if parts else "(libpq defaults)"

    @property
    def dbname(self) -> str | None:
        """The database name, or ``None`` if the connection string does not set it."""
        return self._params().get("dbname")

    def with_dbname(self, dbname: str) -> ConnectionSettings:
        """Return the same settings for another database (such as ``postgres``).

        Args:
            dbname: The database name.
        """
        return self.with_params(dbname=dbname)

    def with_params(self, **params: str) -> ConnectionSettings:
        """Return the same settings with libpq parameters added or replaced.

        Args:
            **params: libpq parameters, such as ``application_name="worker"``.

        Raises:
            ConnectionStringError: A parameter is unknown to libpq, contains a NUL
                character, or sets an invalid port.
        """
        for key, value in params.items():
            problem = _text_problem(value)
            if problem is not None:
                raise ConnectionStringError(f"connection parameter {key!r} {problem}")
        merged = self._params()
        merged.update(params)
        _check_port(merged, url=False)
        secrets = (*self._secrets(), *_secret_values(params.items()))
        return ConnectionSettings(
            conninfo=_make_conninfo(merged, secrets),
            pool=self.pool,
            password=merged.get("password"),
        )

    def _secrets(self) -> tuple[str, ...]:
        return (self.password,) if self.password else ()

    def _params(self) -> dict[str, str]:
        return _libpq_parse(self.conninfo, self._secrets(), url=False)


def parse_connection_string(text: str) -> ConnectionSettings:
    """Parse a connection string as accepted by Go neoq's Postgres backend.

    Args:
        text: A ``postgres://`` or ``postgresql://`` URL, or a libpq key=value DSN.
            Either may carry pgxpool options (``pool_max_conns``, ``pool_min_conns``,
            ``pool_max_conn_lifetime``, ``pool_max_conn_idle_time``,
            ``pool_health_check_period``, ``pool_max_conn_lifetime_jitter``), with
            durations in Go syntax such as ``1h30m`` or ``250ms``.

    Returns:
        The libpq connection string without the pool options, and the pool options.

    Raises:
        ConnectionStringError: The string is empty, malformed, has an unsupported
            scheme, an unknown libpq option, an invalid port or an invalid pool option.
            The message names the culprit and never contains the password.
    """
    stripped = text.strip()
    if not stripped:
        raise ConnectionStringError("connection string is empty")
    problem = _text_problem(text)
    if problem is not None:
        raise ConnectionStringError(f"connection string {problem}")
    match = _URL_PREFIX.match(stripped)
    split = _split_url(match[1], stripped[match.end() :]) if match else _split_dsn(text)
    params = _libpq_parse(split.conninfo, split.secrets, url=split.url)
    _check_port(params, url=split.url)
    pool = _parse_pool_options(split.pool)
    return ConnectionSettings(
        conninfo=_make_conninfo(params, split.secrets),
        pool=pool,
        password=params.get("password"),
    )


@dataclass(frozen=True, slots=True)
class _Split:
    """A connection string split into what libpq sees and the pool options."""

    conninfo: str
    pool: dict[str, str]
    # Password-like values found on the way, to keep them out of libpq's messages.
    secrets: tuple[str, ...]
    url: bool


def _text_problem(text: str) -> str | None:
    """Return why libpq cannot be given ``text`` as is, or ``None``."""
    # libpq takes a C string: it would silently drop everything after a NUL.
    if "\x00" in text:
        return "contains a NUL character"
    if any("\ud800" <= char <= "\udfff" for char in text):
        return "is not valid Unicode text (it contains a lone surrogate)"
    return None


# --- URLs ---------------------------------------------------------------------------


def _split_url(scheme: str, rest: str) -> _Split:
    """Take the pool options out of a URL, ``rest`` being what follows ``scheme://``."""
    if scheme.lower() not in _SCHEMES:
        raise ConnectionStringError(
            f"unsupported connection string scheme {scheme!r}: use postgres:// or postgresql://"
        )
    # libpq looks for user:password@ before the first '/', so a raw '?' or '&' may be
    # part of a password: find the query only after the credentials.
    at = _credentials_end(rest)
    user, _, password = rest[: max(at - 1, 0)].partition(":")
    secrets = [password, unquote(password)] if password else []
    _check_percent(user, "user name")
    _check_percent(password, "password")
    if "@" in rest[: max(at - 1, 0)]:
        # libpq would end the credentials at the first '@': encode the others.
        credentials = rest[: at - 1].replace("@", "%40")
        secrets.append(credentials.partition(":")[2])
        rest = f"{credentials}{rest[at - 1 :]}"
        at = len(credentials) + 1
    query_at = _query_start(rest, at)
    head = rest if query_at < 0 else rest[:query_at]
    netloc, _, dbname = head[at:].partition("/")
    _check_percent(netloc, "host or port")
    _check_percent(dbname, "database name")
    query = "" if query_at < 0 else rest[query_at + 1 :]
    kept, pool, query_secrets = _split_query(query)
    # libpq only recognises lower-case schemes.
    conninfo = f"{scheme.lower()}://{head}" + (f"?{'&'.join(kept)}" if kept else "")
    return _Split(conninfo, pool, (*secrets, *query_secrets), url=True)


def _credentials_end(rest: str) -> int:
    """Return the index after ``user:password@`` in ``rest``, or 0 if there is none.

    libpq ends the credentials at the first ``@`` before the first ``/``, so in
    ``postgresql://app:p@ss@db/app`` it would read the password ``p`` and the host
    ``ss@db``, whose name then shows the rest of the password in every connection
    error. No host name contains ``@``, so, like Go's ``net/url`` (which Go neoq
    uses), the credentials run to the last ``@`` before the host ends (at ``/`` or
    ``?``): the password is ``p@ss``.
    """
    first = -1
    for index, char in enumerate(rest):
        if char == "/":
            return 0
        if char == "@":
            first = index
            break
    if first < 0:
        return 0
    ends = [found for found in (rest.find("/", first), rest.find("?", first)) if found >= 0]
    return rest.rfind("@", first, min(ends, default=len(rest))) + 1


def _query_start(rest: str, start: int) -> int:
    """Return the index of the ``?`` starting the URL query, or -1."""
    in_netloc = True
    index = start
    while index < len(rest):
        char = rest[index]
        if char == "?":
            return index
        if in_netloc and char == "[":
            # An IPv6 address: skip to its closing bracket.
            close = rest.find("]", index)
            if close < 0:
                return -1
            index = close
        elif char == "/":
            in_netloc = False
        index += 1
    return -1


def _split_query(query: str) -> tuple[list[str], dict[str, str], list[str]]:
    """Split a URL query into the raw parameters to keep, the pool options and secrets."""
    kept: list[str] = []
    pool: dict[str, str] = {}
    secrets: list[str] = []
    if not query:
        return kept, pool, secrets
    for index, part in enumerate(query.split("&"), start=1):
        raw_key, equals, raw_value = part.partition("=")
        if not equals:
            raise ConnectionStringError(
                f"malformed connection string: URL query parameter {index} has no '=' "
                "(expected key=value)"
            )
        _check_percent(raw_key, f"query parameter {index}")
        key = unquote(raw_key)
        if "=" in raw_value:
            raise ConnectionStringError(
                f"malformed connection string: the value of URL query parameter {key!r} "
                "contains '=' (percent-encode it as %3D)"
            )
        _check_percent(raw_value, f"query parameter {key!r}")
        value = unquote(raw_value)
        if key in _SECRET_KEYS:
            secrets += [raw_value, value]
        if _is_pool_option(key):
            pool[key] = value
        else:
            # Keep the raw text so other parameters keep their percent-encoding.
            kept.append(part)
    return kept, pool, secrets


def _check_percent(component: str, what: str) -> None:
    """Reject percent-encoding that libpq would reject (and quote in its message)."""
    if _BAD_PERCENT.search(component):
        raise ConnectionStringError(
            f"malformed connection string: invalid percent-encoding in the URL's {what} "
            "('%' must be followed by two hex digits; write '%' itself as %25)"
        )
    if "%00" in component:
        raise ConnectionStringError(
            f"malformed connection string: the URL's {what} contains %00 (a NUL byte)"
        )


# --- key=value DSNs -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pair:
    """One ``key=value`` of a DSN, with its span in the text."""

    key: str
    value: str
    start: int
    end: int


def _split_dsn(text: str) -> _Split:
    """Take the pool options out of a key=value DSN, keeping the rest verbatim."""
    pairs = _tokenize_dsn(text)
    pool = {pair.key: pair.value for pair in pairs if _is_pool_option(pair.key)}
    kept = " ".join(text[pair.start : pair.end] for pair in pairs if pair.key not in pool)
    secrets = tuple(_secret_values((pair.key, pair.value) for pair in pairs))
    return _Split(kept, pool, secrets, url=False)


def _tokenize_dsn(text: str) -> list[_Pair]:
    """Split a DSN into pairs following libpq's ``conninfo_parse()`` rules.

    Keys end at ``=`` or whitespace; whitespace may surround ``=``; a value is either
    single-quoted (``\\'`` and ``\\\\`` escapes) or runs to the next unescaped whitespace.

    Raises:
        ConnectionStringError: A word has no ``=`` or a quoted value is unterminated.
    """
    pairs: list[_Pair] = []
    pos, end = 0, len(text)
    while pos < end:
        if text[pos] in _SPACE:
            pos += 1
            continue
        start = pos
        while pos < end and text[pos] != "=" and text[pos] not in _SPACE:
            pos += 1
        key = text[start:pos]
        pos = _skip_space(text, pos)
        if pos >= end or text[pos] != "=":
            previous = pairs[-1].key if pairs else None
            raise ConnectionStringError(_missing_equals_message(key, previous, pairs))
        pos = _skip_space(text, pos + 1)
        value, pos = _read_value(text, pos, key)
        pairs.append(_Pair(key, value, start, pos))
    return pairs


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    return pos


def _read_value(text: str, pos: int, key: str) -> tuple[str, int]:
    """Read the value starting at ``pos``; return it unescaped and the position after it."""
    chars: list[str] = []
    quoted = pos < len(text) and text[pos] == "'"
    if quoted:
        pos += 1
    while True:
        if pos >= len(text):
            if quoted:
                raise ConnectionStringError(
                    f"malformed connection string: unterminated quoted value for {key!r} "
                    f"({_KEYVALUE_HINT})"
                )
            return "".join(chars), pos
        char = text[pos]
        if char == "\\":
            # A backslash escapes the next character, quoted or not.
            chars.append(text[pos + 1 : pos + 2])
            pos += 2
        elif quoted and char == "'":
            return "".join(chars), pos + 1
        elif not quoted and char in _SPACE:
            return "".join(chars), pos
        else:
            chars.append(char)
            pos += 1


def _missing_equals_message(word: str, previous: str | None, pairs: list[_Pair]) -> str:
    """Describe a word without ``=``, naming it only if it cannot be a secret."""
    secrets = _secret_values((pair.key, pair.value) for pair in pairs)
    # After an unquoted password with a space, the word is the rest of the password.
    nameable = (
        previous not in _SECRET_KEYS
        and (word in _libpq_keywords() or word in POOL_OPTION_NAMES)
        and not any(secret in word for secret in secrets if secret)
    )
    if nameable:
        return f"malformed connection string: missing '=' after {word!r} ({_KEYVALUE_HINT})"
    if previous is None:
        return (
            "malformed connection string: expected key=value pairs "
            "or a postgres:// or postgresql:// URL"
        )
    return (
        f"malformed connection string: a word without '=' follows the value of {previous!r} "
        "(single-quote values that contain spaces, e.g. key='a b')"
    )


@cache
def _libpq_keywords() -> frozenset[str]:
    return frozenset(option.keyword.decode() for option in pq.Conninfo.get_defaults())


# --- shared -------------------------------------------------------------------------


def _is_pool_option(key: str) -> bool:
    """Whether ``key`` is a pool option; raise if it looks like one but is unknown."""
    if key in POOL_OPTION_NAMES:
        return True
    if key.startswith("pool_"):
        raise ConnectionStringError(
            f"unknown pool option {key!r} (known: {', '.join(POOL_OPTION_NAMES)})"
        )
    return False


def _secret_values(items: Iterable[tuple[str, str]]) -> list[str]:
    return [value for key, value in items if key in _SECRET_KEYS and value]


def _libpq_parse(conninfo: str, secrets: Iterable[str], *, url: bool) -> dict[str, str]:
    """Parse ``conninfo`` with libpq, translating its errors into safe ones."""
    try:
        return {key: str(value) for key, value in conninfo_to_dict(conninfo).items()}
    except psycopg.Error as exc:
        message = _safe_libpq_message(str(exc), secrets, url=url)
    # Raised outside the except block so that no __context__ carries libpq's message.
    raise ConnectionStringError(message) from None


def _make_conninfo(params: Mapping[str, str], secrets: Iterable[str]) -> str:
    """Build a key=value conninfo from ``params``, translating libpq's errors."""
    try:
        return make_conninfo("", **params)
    except psycopg.Error as exc:
        message = _safe_libpq_message(str(exc), secrets, url=False)
    raise ConnectionStringError(message) from None


def _safe_libpq_message(message: str, secrets: Iterable[str], *, url: bool) -> str:
    """Return libpq's ``message`` if it names only an option, else a generic message."""
    message = message.strip()
    for pattern in _SAFE_LIBPQ_MESSAGES:
        match = pattern.fullmatch(message)
        if match and not any(secret in match["name"] for secret in secrets if secret):
            return message
    if url:
        return (
            "malformed connection string: libpq could not parse the URL (check the host "
            "list, brackets around IPv6 addresses and percent-encoding of special characters)"
        )
    return f"malformed connection string: libpq could not parse it ({_KEYVALUE_HINT})"


def _check_port(params: Mapping[str, str], *, url: bool) -> None:
    """Reject a non-numeric port now: libpq would only complain when connecting."""
    port = params.get("port")
    if port is None or all(_is_port(piece) for piece in port.split(",")):
        return
    if url:
        # A '/' in an unencoded password makes libpq read part of it as the port: don't quote.
        raise ConnectionStringError(
            "invalid port in the URL: a port must be a number from 1 to 65535 "
            "(percent-encode characters such as '/', ':' and '@' in the user name and password)"
        )
    raise ConnectionStringError(
        f"invalid port {port!r}: a port must be a number from 1 to 65535 "
        "(comma-separated when there are several hosts)"
    )


def _is_port(piece: str) -> bool:
    # An empty entry in a multi-host list means the default port.
    piece = piece.strip("".join(_SPACE))
    return not piece or (_PORT.fullmatch(piece) is not None and 1 <= int(piece) <= 65535)


def _parse_pool_options(raw: Mapping[str, str]) -> PoolOptions:
    """Build the pool options found in a connection string.

    This only turns their text into numbers; :class:`PoolOptions` checks the ranges, and
    its error is reworded here to name the option and its text.
    """
    values: dict[str, Any] = {}
    for name in POOL_OPTION_NAMES:
        text = raw.get(name)
        if text is not None:
            parse = _pool_count if name in _POOL_COUNTS else _pool_duration
            values[name.removeprefix("pool_")] = parse(name, text)
    try:
        return PoolOptions(**values)
    except PoolOptionsError as exc:
        # The defaults are valid, so the culprit is an option the string sets.
        option = f"pool_{exc.option}"
        message = f"invalid {option} {raw[option]!r}: {exc.reason(prefix='pool_')}"
    raise ConnectionStringError(message) from None


def _pool_count(name: str, text: str) -> int | str:
    """Parse an integer pool option as pgxpool does (an int32).

    Text that is not a number is returned as it is, for :class:`PoolOptions` to refuse as
    it refuses any count that is not an integer.
    """
    if not _DIGITS.fullmatch(text):
        return text
    # pgxpool parses these as int32; the length check also spares int() huge inputs.
    value = int(text) if len(text) <= 10 else _INT32_MAX + 1
    if value > _INT32_MAX:
        raise ConnectionStringError(f"invalid {name} {text!r}: must be at most {_INT32_MAX}")
    return value


def _pool_duration(name: str, text: str) -> float:
    """Parse a Go duration pool option into seconds."""
    try:
        return parse_go_duration(text)
    except DurationSyntaxError as exc:
        reason = exc.reason
    raise ConnectionStringError(f"invalid {name} {text!r}: {reason}") from None


def _quote_value(value: str) -> str:
    """Quote ``value`` as libpq (and psycopg's ``make_conninfo``) would."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'" if not value or any(char.isspace() for char in value) else escaped


def _secret_pattern(secret: str) -> re.Pattern[str]:
    """Match ``secret`` as written raw, fully or partly percent-encoded, or libpq-escaped."""
    alternatives = []
    for char in secret:
        forms = [re.escape(char)]
        # Percent-encoded as in a URL (hex digits in either case).
        encoded = "".join(f"%{byte:02x}" for byte in char.encode())
        forms.append(f"(?i:{re.escape(encoded)})")
        if char in "\\'":
            # Backslash-escaped as in a key=value conninfo.
            forms.append(re.escape("\\" + char))
        alternatives.append(f"(?:{'|'.join(forms)})")
    return re.compile("".join(alternatives))
