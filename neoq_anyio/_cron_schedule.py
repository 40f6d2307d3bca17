"""Cron schedules: parse a periodic-job spec, describe it, name its queue, compute its ticks.

The spec format is robfig/cron's (the scheduler Go neoq uses), as the project fixes it:

* five fields, minute first: ``min hour dom month dow`` (``"*/5 * * * *"``);
* six fields with a *leading* seconds field: ``sec min hour dom month dow``
  (``"*/10 * * * * *"`` fires every ten seconds);
* fields hold ``*``, numbers, ranges ``a-b``, steps ``*/n``, ``a-b/n`` and ``a/n``
  (``a`` up to the field's maximum, as in robfig) and comma lists; ``?`` means ``*`` in the
  day-of-month and day-of-week fields; months may be named ``JAN``-``DEC`` and days
  ``SUN``-``SAT`` (any case). Day of week runs 0-6 (Sunday is 0; robfig rejects 7).
  croniter's extensions (``L``, ``W``, ``#``, ``H``, ``R``, wrap-around ranges such as
  ``FRI-MON``) are refused, so a spec means the same thing to Go neoq and to us;
* descriptors ``@yearly``/``@annually``, ``@monthly``, ``@weekly``, ``@daily``/``@midnight``
  and ``@hourly``, which stand for their five-field equivalents;
* ``@every <duration>`` with a Go duration (``"@every 1h30m"``), a whole number of seconds,
  at least one second. robfig rounds shorter intervals up to a second and truncates
  fractions of a second; we refuse both (``"@every 500ms"``, ``"@every 1.5s"``) rather than
  fire at a rate the spec does not say.

Cron specs are evaluated in UTC unless a time zone is given (croniter handles daylight-saving
transitions: a wall-clock time skipped by a spring-forward fires at the first instant after
the gap, and one repeated by a fall-back fires on both occurrences). ``@every`` schedules
ignore the time zone: their ticks are the multiples of the interval since the Unix epoch
(1970-01-01T00:00:00Z), so every process computes the same ticks whenever it starts. That
differs from robfig, whose ``@every`` counts from when the scheduler started.

Queue names follow Go neoq: ``StripNonAlphanum(strcase.ToSnake(description))``, where the
description is go-cron-descriptor's full English description of the spec. We produce the
description with Python's cron-descriptor, nudged towards go-cron-descriptor's wording where
the two differ for common specs (see :class:`_GoStyleDescriptor`), and re-implement
iancoleman/strcase's ``ToSnake``. Go neoq cannot describe descriptors or ``@every`` at all
(go-cron-descriptor needs five fields), so we describe a descriptor's five-field
equivalent, and ``@every <d>`` is described as ``"Every <d>"`` with the queue name
``every_<d>`` (``<d>`` as written, lowercased, ``.`` turned into ``_`` and micro signs into
``u``, other characters outside ``[a-z0-9_]`` dropped).
"""

from __future__ import annotations

import re
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Final

from cron_descriptor import (  # type: ignore[import-untyped, unused-ignore]
    CasingTypeEnum,
    DescriptionTypeEnum,
    ExpressionDescriptor,
    Options,
)
from croniter import (  # type: ignore[import-untyped, unused-ignore]
    CroniterBadDateError,
    croniter,
)

from neoq_anyio._durations import parse_go_duration
from neoq_anyio._exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["CronSchedule", "derive_queue_name", "parse_cron_spec"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND: Final = timedelta(microseconds=1)

# Descriptors and the five-field specs they stand for (robfig's meaning).
_DESCRIPTORS: Final[dict[str, str]] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTHS: Final[dict[str, int]] = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
_DAYS: Final[dict[str, int]] = {
    name: number for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
}

# One element of a comma list: "*", "?", "5", "mon", "1-5", "jan-mar", each with an optional
# "/step".
_ELEMENT_RE: Final = re.compile(
    r"(?:(?P<star>[*?])|(?P<low>[0-9]+|[a-z]+)(?:-(?P<high>[0-9]+|[a-z]+))?)(?:/(?P<step>[0-9]+))?",
    re.IGNORECASE,
)
_NOT_QUEUE_CHAR: Final = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True, slots=True)
class _Field:
    """Bounds, names and rules of one cron field."""

    name: str
    low: int
    high: int
    names: dict[str, int] = field(default_factory=dict)
    question_mark: bool = False


# Seconds first, as croniter's ``second_at_beginning=True`` expects.
_FIELDS: Final = (
    _Field("second", 0, 59),
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31, question_mark=True),
    _Field("month", 1, 12, _MONTHS),
    _Field("day-of-week", 0, 6, _DAYS, question_mark=True),
)


@dataclass(frozen=True, slots=True)
class _Translated:
    """A spec translated for croniter, or an ``@every`` interval.

    Attributes:
        fields: The spec as written, split into six fields (seconds first; ``"0"`` added to
            a five-field spec), for the description. ``None`` for ``@every``.
        cron_expr: The canonical six-field expression handed to croniter, or ``None``.
        every: The ``@every`` interval in whole seconds, or ``None``.
        every_text: The ``@every`` duration as written, or ``None``.
    """

    fields: tuple[str, ...] | None = None
    cron_expr: str | None = None
    every: int | None = None
    every_text: str | None = None


@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A validated periodic-job schedule.

    Build one with :func:`parse_cron_spec`, which hands over the translation it made;
    constructing it directly translates and validates ``spec`` here (``description`` and
    ``queue_name`` are then taken as given).

    Attributes:
        spec: The spec as given by the user.
        description: Its English description (cron-descriptor, in go-cron-descriptor's
            wording where we could match it).
        queue_name: The queue its jobs go to, derived from ``description`` as Go neoq does.
        tz: The time zone cron fields are evaluated in (UTC unless given; unused by
            ``@every``).
    """

    spec: str
    description: str
    queue_name: str
    tz: tzinfo = UTC
    # The translation of ``spec`` when the caller already made it (parse_cron_spec does).
    _translated: InitVar[_Translated | None] = None
    _cron_expr: str | None = field(init=False, repr=False, compare=False)
    _every: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self, _translated: _Translated | None) -> None:
        if not isinstance(self.tz, tzinfo):
            raise ConfigurationError(
                f"tz must be a datetime.tzinfo (such as zoneinfo.ZoneInfo('Europe/Paris')), "
                f"got {self.tz!r}"
            )
        translated = _translate(self.spec) if _translated is None else _translated
        object.__setattr__(self, "_cron_expr", translated.cron_expr)
        object.__setattr__(self, "_every", translated.every)
        if translated.cron_expr is not None:
            _check_fires(self.spec, translated.cron_expr, self.tz)

    def next_after(self, after: datetime) -> datetime:
        """Return the first tick strictly after ``after``.

        Args:
            after: An aware datetime.

        Returns:
            The tick, an aware datetime in UTC.

        Raises:
            ValueError: ``after`` is naive.
        """
        _require_aware(after, "after")
        if self._every is not None:
            step = self._every * 1_000_000
            micros = (after - _EPOCH) // _ONE_MICROSECOND
            return _EPOCH + timedelta(microseconds=(micros // step + 1) * step)
        assert self._cron_expr is not None  # one of the two is always set
        return _cron_next(self._cron_expr, after.astimezone(self.tz)).astimezone(UTC)


def parse_cron_spec(spec: str, *, tz: tzinfo | None = None) -> CronSchedule:
    """Parse and validate a periodic-job spec.

    Args:
        spec: A five-field or six-field (seconds first) cron spec, a descriptor such as
            ``"@daily"``, or ``"@every <go duration>"``.
        tz: The time zone cron fields are evaluated in; UTC when ``None``.

    Returns:
        The schedule, with its description and queue name.

    Raises:
        ConfigurationError: The spec is malformed (its message quotes the spec and says
            what is wrong), never fires, or cannot be described.
    """
    zone = UTC if tz is None else tz
    translated = _translate(spec)
    if translated.every_text is not None:
        description = f"Every {translated.every_text}"
        queue_name = _every_queue_name(translated.every_text)
    else:
        assert translated.fields is not None
        description = _describe(spec, translated.fields)
        queue_name = derive_queue_name(description)
    if not queue_name:
        raise ConfigurationError(
            f"invalid cron spec {spec!r}: its description {description!r} gives no queue name"
        )
    return CronSchedule(
        spec=spec,
        description=description,
        queue_name=queue_name,
        tz=zone,
        _translated=translated,
    )


def derive_queue_name(description: str) -> str:
    """Derive a queue name from a schedule's description, as Go neoq does.

    Go neoq computes ``internal.StripNonAlphanum(strcase.ToSnake(description))``: the
    description in iancoleman/strcase's snake_case, without the characters outside
    ``[a-zA-Z0-9_]``. ``"Every second"`` gives ``"every_second"`` and ``"At 09:30 AM,
    Monday through Friday"`` gives ``"at_0930_am_monday_through_friday"``.

    Args:
        description: The English description.

    Returns:
        The queue name (possibly empty, for a description without letters or digits).
    """
    return _NOT_QUEUE_CHAR.sub("", _to_snake(description))


# --- translation -------------------------------------------------------------------------


def _translate(spec: str) -> _Translated:
    """Translate a spec into croniter's canonical six-field form or an ``@every`` interval.

    Raises:
        ConfigurationError: The spec is malformed.
    """
    if not isinstance(spec, str):
        raise ConfigurationError(f"cron spec must be a str, got {type(spec).__name__}")
    words = spec.split()
    if not words:
        raise ConfigurationError(f"invalid cron spec {spec!r}: it is empty")
    head = words[0].lower()
    if head.startswith("@"):
        if head == "@every":
            return _translate_every(spec, words[1:])
        if len(words) == 1 and head in _DESCRIPTORS:
            return _translate_fields(spec, _DESCRIPTORS[head].split())
        if head in _DESCRIPTORS:
            raise ConfigurationError(
                f"invalid cron spec {spec!r}: the descriptor {words[0]} takes no arguments"
            )
        known = ", ".join([*_DESCRIPTORS, "@every <duration>"])
        raise ConfigurationError(
            f"invalid cron spec {spec!r}: unknown descriptor {words[0]!r} (known: {known})"
        )
    return _translate_fields(spec, words)


def _translate_every(spec: str, args: list[str]) -> _Translated:
    """Translate the arguments of ``@every`` into a whole number of seconds."""
    if len(args) != 1:
        raise ConfigurationError(
            f"invalid cron spec {spec!r}: @every takes exactly one Go duration, "
            "such as '@every 1h30m'"
        )
    text = args[0]
    try:
        seconds = parse_go_duration(text)
    except ValueError as exc:
        raise ConfigurationError(f"invalid cron spec {spec!r}: {exc}") from exc
    if seconds < 1:
        raise ConfigurationError(
            f"invalid cron spec {spec!r}: the @every interval must be at least one second"
        )
    if not seconds.is_integer():
        raise ConfigurationError(
            f"invalid cron spec {spec!r}: the @every interval must be a whole number of "
            f"seconds (got {seconds}s)"
        )
    return _Translated(every=int(seconds), every_text=text)


def _translate_fields(spec: str, words: list[str]) -> _Translated:
    """Validate five or six cron fields and canonicalise them for croniter."""
    if len(words) == 5:
        fields = ("0", *words)
    elif len(words) == 6:
        fields = tuple(words)
    else:
        raise ConfigurationError(
            f"invalid cron spec {spec!r}: it has {len(words)} "
            f"{'field' if len(words) == 1 else 'fields'}; expected 5 "
            "(minute hour day-of-month month day-of-week) or 6 (a leading seconds field, "
            "then those five), or a descriptor such as @daily or @every 1h"
        )
    canonical = [
        _canonical_field(spec, text, rules) for text, rules in zip(fields, _FIELDS, strict=True)
    ]
    return _Translated(fields=fields, cron_expr=" ".join(canonical))


def _canonical_field(spec: str, text: str, rules: _Field) -> str:
    """Validate one field and rewrite it with numbers only, in a form croniter reads as robfig.

    The rewrite sidesteps croniter's own readings: an equal range ``a-a`` is the whole cycle
    to croniter but the single value ``a`` to robfig, and names are resolved here.
    """
    return ",".join(_canonical_element(spec, element, rules) for element in text.split(","))


def _canonical_element(spec: str, element: str, rules: _Field) -> str:
    """Validate one comma-separated element of a field and rewrite it for croniter."""

    def fail(reason: str) -> ConfigurationError:
        return ConfigurationError(f"invalid cron spec {spec!r}: {rules.name} field {reason}")

    match = _ELEMENT_RE.fullmatch(element)
    if match is None:
        raise fail(f"{element!r} is not a number, range, step or list" + _hint(rules))
    step_text = match["step"]
    step = None if step_text is None else int(step_text)
    if step is not None and step < 1:
        raise fail(f"{element!r} has a step of {step}; it must be at least 1")
    star = match["star"]
    if star is not None:
        if star == "?" and not rules.question_mark:
            raise fail(f"{element!r}: '?' is only allowed in day-of-month and day-of-week")
        if star == "?" and step is not None:
            raise fail(f"{element!r}: '?' cannot take a step")
        return "*" if step is None else f"*/{step}"
    low = _value(element, match["low"], rules, fail)
    if match["high"] is None:
        if step is None:
            return str(low)
        # robfig: "a/n" runs from a to the field's maximum.
        high = rules.high
    else:
        high = _value(element, match["high"], rules, fail)
        if low > high:
            raise fail(f"{element!r} is a range that runs backwards ({low} > {high})")
    if low == high:
        return str(low)
    return f"{low}-{high}" if step is None else f"{low}-{high}/{step}"


def _value(
    element: str,
    text: str,
    rules: _Field,
    fail: Callable[[str], ConfigurationError],
) -> int:
    """Resolve a number or a name of a field, checking the field's bounds."""
    if text.isdigit():
        number = int(text)
        if not rules.low <= number <= rules.high:
            raise fail(f"{element!r} is out of range: {number} is not in {rules.low}-{rules.high}")
        return number
    number_or_none = rules.names.get(text.lower())
    if number_or_none is None:
        raise fail(f"{element!r}: {text!r} is not a valid value" + _hint(rules))
    return number_or_none


def _hint(rules: _Field) -> str:
    """A short reminder of what a field accepts."""
    names = ""
    if rules.names:
        first, *_, last = rules.names
        names = f" or names {first.upper()}-{last.upper()}"
    return f" (expected values {rules.low}-{rules.high}{names})"


# --- croniter ----------------------------------------------------------------------------


def _cron_next(cron_expr: str, after: datetime) -> datetime:
    """The first tick of ``cron_expr`` strictly after ``after`` (aware, in the schedule's zone)."""
    result: datetime = croniter(cron_expr, after, second_at_beginning=True).get_next(datetime)
    return result


def _check_fires(spec: str, cron_expr: str, tz: tzinfo) -> None:
    """Check that croniter accepts ``cron_expr`` and finds a tick for it.

    Raises:
        ConfigurationError: croniter refuses the expression or finds no tick within its
            search window (e.g. February 30th).
    """
    try:
        _cron_next(cron_expr, _EPOCH.astimezone(tz))
    except CroniterBadDateError as exc:
        raise ConfigurationError(
            f"invalid cron spec {spec!r}: it never fires (no such date, e.g. February 30)"
        ) from exc
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise ConfigurationError(
            f"invalid cron spec {spec!r}: croniter refuses it ({exc})"
        ) from exc


def _require_aware(moment: datetime, name: str) -> None:
    """Raise ``ValueError`` unless ``moment`` is an aware datetime."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {moment!r}")


# --- description and queue name ----------------------------------------------------------

# Python cron-descriptor phrases that go-cron-descriptor words differently.
_GO_PHRASES: Final[dict[str, str]] = {
    # Hour ranges: Go says "09:00 AM through 05:59 PM".
    "between {0} and {1}": "{0} through {1}",
    # Go always says "only on <day>", even when day-of-month is restricted too.
    ", or on {0}": ", only on {0}",
    # Go's second and minute ranges start with a comma (so does their description).
    "seconds {0} through {1} past the minute": ", seconds {0} through {1} past the minute",
    "minutes {0} through {1} past the hour": ", minutes {0} through {1} past the hour",
}
_AT_ZERO_MINUTES: Final = "at 0 minutes past the hour"


class _GoStyleDescriptor(ExpressionDescriptor):  # type: ignore[misc]
    """Python cron-descriptor, steered towards go-cron-descriptor's default output.

    go-cron-descriptor (sentence case, 12-hour clock, Sunday = 0, not verbose) differs from
    Python cron-descriptor in ways that change queue names. We match it for:

    * midnight hours: Go writes ``00:00 AM`` where Python writes ``12:00 AM``;
    * minute ``0``: Go says ``at 0 minutes past the hour`` (so ``0 * * * *`` is "At 0 minutes
      past the hour", not "Every hour") and drops that phrase only when another time phrase
      follows it (``0 */2 * * *`` is "Every 2 hours"; ``0 9-17 * * *`` is "09:00 AM through
      05:59 PM");
    * a single hour after a seconds or minutes wildcard: Go says ``at 03:00 AM`` where Python
      rewrites the hour as the range ``3-3``;
    * the phrases in ``_GO_PHRASES``.

    Known remaining differences (rare specs): start offsets (``10/4`` in seconds: Go "every 4
    seconds, starting at 10", Python "..., starting at 10 seconds past the minute"),
    day-of-week steps (Python speaks of weeks), lists mixing ranges, and Go's own bugs
    (``0-20/2`` in hours repeats the range text in Go). Day and month names come from
    Python's ``calendar``/``strftime``, which follow the process's LC_TIME locale; keep it
    English (the default "C" locale is) for Go-compatible queue names.
    """

    def __init__(self, fields: tuple[str, ...]) -> None:
        options = Options(
            CasingTypeEnum.Sentence,
            verbose=False,
            day_of_week_start_index_zero=True,
            use_24hour_time_format=False,
            locale_code="en_US",
        )
        # Seven fields (seconds first, any year): cron-descriptor then never has to guess
        # whether a six-field spec starts with seconds or ends with a year.
        super().__init__(" ".join((*fields, "*")), options)
        self._neoq_minute = fields[1]
        self._neoq_hour = fields[2]

    def translate(self, message: str) -> str:
        go_phrase = _GO_PHRASES.get(message)
        if go_phrase is not None:
            return go_phrase
        return str(super().translate(message))

    def format_time(
        self,
        hour_expression: str,
        minute_expression: str,
        second_expression: str | None = None,
    ) -> str:
        text = str(super().format_time(hour_expression, minute_expression, second_expression))
        if int(hour_expression) == 0 and text.startswith("12:"):
            text = "00" + text[2:]
        return text

    def get_minutes_description(self) -> str:
        if self._neoq_minute == "0":
            return _AT_ZERO_MINUTES
        return str(super().get_minutes_description())

    def get_hours_description(self) -> str:
        if self._neoq_hour.isdigit():
            return f"at {self.format_time(self._neoq_hour, '0')}"
        return str(super().get_hours_description())

    def transform_verbosity(self, description: str, *, use_verbose_format: bool = False) -> str:
        text = str(super().transform_verbosity(description, use_verbose_format=use_verbose_format))
        if not use_verbose_format:
            text = text.replace(_AT_ZERO_MINUTES + ", ", "")
        return text


def _describe(spec: str, fields: tuple[str, ...]) -> str:
    """Describe six cron fields (seconds first) in go-cron-descriptor's English.

    Raises:
        ConfigurationError: cron-descriptor cannot describe the spec.
    """
    try:
        description = _GoStyleDescriptor(fields).get_description(DescriptionTypeEnum.FULL)
    except Exception as exc:  # cron-descriptor raises bare Exceptions and FormatError
        raise ConfigurationError(
            f"invalid cron spec {spec!r}: cron-descriptor cannot describe it ({exc})"
        ) from exc
    return str(description)


def _every_queue_name(duration_text: str) -> str:
    """The queue name of ``@every <duration_text>``: ``every_`` and the duration as written.

    Lowercased; ``.`` becomes ``_`` (so ``1.5h`` and ``15h`` differ) and the micro signs
    become ``u``; anything else outside ``[a-z0-9_]`` is dropped.
    """
    text = duration_text.lower().replace(".", "_").replace("\u00b5", "u").replace("\u03bc", "u")
    return "every_" + _NOT_QUEUE_CHAR.sub("", text)


def _is_upper(char: str) -> bool:
    return "A" <= char <= "Z"


def _is_lower(char: str) -> bool:
    return "a" <= char <= "z"


def _is_digit(char: str) -> bool:
    return "0" <= char <= "9"


def _to_snake(text: str) -> str:
    """snake_case ``text`` the way iancoleman/strcase's ``ToSnake`` does.

    Only ASCII letters and digits are classified: a delimiter goes between a lower-case
    letter and a following capital or digit, between a digit and a following letter, and
    between a capital and a following digit; a capital followed by a lower-case letter
    starts a new word when a capital precedes it (``JSONData`` -> ``json_data``). Spaces,
    ``_``, ``-`` and ``.`` become ``_``; everything else is kept (the caller strips it).
    """
    text = text.strip()
    out: list[str] = []
    last = len(text) - 1
    for i, char in enumerate(text):
        is_upper = _is_upper(char)
        is_lower = _is_lower(char)
        is_digit = _is_digit(char)
        lowered = char.lower() if is_upper else char
        if i < last:
            following = text[i + 1]
            next_upper = _is_upper(following)
            next_lower = _is_lower(following)
            next_digit = _is_digit(following)
            if (
                (is_upper and (next_lower or next_digit))
                or (is_lower and (next_upper or next_digit))
                or (is_digit and (next_upper or next_lower))
            ):
                if is_upper and next_lower and i > 0 and _is_upper(text[i - 1]):
                    out.append("_")
                out.append(lowered)
                if is_lower or is_digit or next_digit:
                    out.append("_")
                continue
        out.append("_" if char in " _-." else lowered)
    return "".join(out)
