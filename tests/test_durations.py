"""Tests for neoq_anyio._durations: Go duration syntax and option values in seconds."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from fractions import Fraction

import pytest

from neoq_anyio._durations import DurationSyntaxError, parse_go_duration, to_seconds
from neoq_anyio._exceptions import ConfigurationError

UNITS_HINT = "(use ns, us, ms, s, m or h)"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("300ms", 0.3, id="milliseconds"),
        pytest.param("-1.5h", -5400.0, id="negative-fractional-hours"),
        pytest.param("2h45m", 9900.0, id="hours-minutes"),
        pytest.param("1h30m", 5400.0, id="hour-and-a-half"),
        pytest.param("250ms", 0.25, id="quarter-second"),
        pytest.param("1.5s", 1.5, id="fractional-seconds"),
        pytest.param("10us", 1e-5, id="us"),
        pytest.param("10\u00b5s", 1e-5, id="micro-sign"),
        pytest.param("10\u03bcs", 1e-5, id="greek-mu"),
        pytest.param("5ns", 5e-9, id="nanoseconds"),
        pytest.param("0", 0.0, id="bare-zero"),
        pytest.param("-0", 0.0, id="negative-bare-zero"),
        pytest.param("+0", 0.0, id="positive-bare-zero"),
        pytest.param("0s", 0.0, id="zero-seconds"),
        pytest.param("+5s", 5.0, id="plus-sign"),
        pytest.param(".5s", 0.5, id="fraction-only"),
        pytest.param("1.s", 1.0, id="trailing-dot"),
        pytest.param("1h1m1s1ms1us1ns", 3661.001001001, id="every-unit"),
        pytest.param("1m1h", 3660.0, id="units-in-any-order"),
        pytest.param("0.1ns", 0.0, id="sub-nanosecond-truncated"),
        pytest.param("1.0000000001s", 1.0, id="beyond-nanosecond-precision"),
        pytest.param("2562047h", 2562047 * 3600.0, id="near-int64-limit"),
    ],
)
def test_parse_go_duration_valid(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("", "empty duration", id="empty"),
        pytest.param("1d", f"unknown unit 'd' {UNITS_HINT}", id="days"),
        pytest.param("1H", f"unknown unit 'H' {UNITS_HINT}", id="upper-case-unit"),
        pytest.param("1h 30m", f"unknown unit 'h ' {UNITS_HINT}", id="inner-space"),
        pytest.param("1e3s", f"unknown unit 'e' {UNITS_HINT}", id="exponent"),
        pytest.param("5", f"missing unit {UNITS_HINT}", id="number-without-unit"),
        pytest.param("00", f"missing unit {UNITS_HINT}", id="double-zero"),
        pytest.param("1.5.5s", f"missing unit {UNITS_HINT}", id="two-dots"),
        pytest.param("1h30", f"missing unit {UNITS_HINT}", id="last-unit-missing"),
        pytest.param("-", "missing number", id="sign-only"),
        pytest.param("s", "expected a number followed by a unit", id="unit-only"),
        pytest.param(".s", "expected a number followed by a unit", id="dot-unit"),
        pytest.param(" 1s", "expected a number followed by a unit", id="leading-space"),
        pytest.param("--1s", "expected a number followed by a unit", id="double-sign"),
        pytest.param("abc", "expected a number followed by a unit", id="word"),
        pytest.param("2562048h", "out of range", id="beyond-int64"),
    ],
)
def test_parse_go_duration_invalid(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid duration {text!r}: {reason}")):
        parse_go_duration(text)


def test_parse_go_duration_error_carries_text_and_reason() -> None:
    with pytest.raises(DurationSyntaxError) as info:
        parse_go_duration("1d")
    assert str(info.value) == f"invalid duration '1d': unknown unit 'd' {UNITS_HINT}"
    assert info.value.text == "1d"
    assert info.value.reason == f"unknown unit 'd' {UNITS_HINT}"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param(5, 5.0, id="int"),
        pytest.param(1.5, 1.5, id="float"),
        pytest.param(0, 0.0, id="zero"),
        pytest.param(timedelta(minutes=2, milliseconds=5), 120.005, id="timedelta"),
        pytest.param(timedelta(0), 0.0, id="zero-timedelta"),
        pytest.param(Fraction(1, 4), 0.25, id="fraction"),
    ],
)
def test_to_seconds_valid(value: float | timedelta, seconds: float) -> None:
    result = to_seconds(value, name="job_timeout")
    assert result == pytest.approx(seconds)
    assert type(result) is float


def test_to_seconds_none_when_allowed() -> None:
    assert to_seconds(None, name="job_timeout", allow_none=True) is None
    assert to_seconds(3, name="job_timeout", allow_none=True) == 3.0


_NON_NEGATIVE = "job_timeout must be a non-negative number of seconds or a timedelta"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param(-1, f"{_NON_NEGATIVE}, got -1", id="negative-int"),
        pytest.param(-0.5, f"{_NON_NEGATIVE}, got -0.5", id="negative-float"),
        pytest.param(
            timedelta(seconds=-1),
            f"{_NON_NEGATIVE}, got datetime.timedelta(days=-1, seconds=86399)",
            id="negative-timedelta",
        ),
        pytest.param(True, f"{_NON_NEGATIVE}, got True (a bool is not a duration)", id="true"),
        pytest.param(False, f"{_NON_NEGATIVE}, got False (a bool is not a duration)", id="false"),
        pytest.param("5", f"{_NON_NEGATIVE}, got '5' (str)", id="string"),
        pytest.param(None, f"{_NON_NEGATIVE}, got None", id="none-not-allowed"),
        pytest.param(math.nan, f"{_NON_NEGATIVE}, got nan", id="nan"),
        pytest.param(math.inf, f"{_NON_NEGATIVE}, got inf", id="infinity"),
        pytest.param(-math.inf, f"{_NON_NEGATIVE}, got -inf", id="negative-infinity"),
        pytest.param(10**400, _NON_NEGATIVE, id="int-too-large-for-float"),
    ],
)
def test_to_seconds_invalid(value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        to_seconds(value, name="job_timeout")  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "value",
    [pytest.param(0, id="int"), pytest.param(0.0, id="float"), pytest.param(timedelta(), id="td")],
)
def test_to_seconds_rejects_zero_when_not_allowed(value: float | timedelta) -> None:
    expected = "interval must be a positive number of seconds or a timedelta, got"
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        to_seconds(value, name="interval", allow_zero=False)


def test_to_seconds_message_mentions_none_when_allowed() -> None:
    expected = "deadline must be a non-negative number of seconds or a timedelta, or None, got -2"
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        to_seconds(-2, name="deadline", allow_none=True)
