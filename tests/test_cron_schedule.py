"""Tests of neoq_anyio._cron_schedule: spec parsing, ticks, time zones, queue names."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from neoq_anyio import _cron_schedule
from neoq_anyio._cron_schedule import CronSchedule, derive_queue_name, parse_cron_spec
from neoq_anyio._exceptions import ConfigurationError

# A Thursday.
START = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NEW_YORK = ZoneInfo("America/New_York")


def ticks_between(schedule: CronSchedule, start: datetime, end: datetime) -> list[datetime]:
    """The ticks t with start < t <= end, in order."""
    ticks = []
    tick = schedule.next_after(start)
    while tick <= end:
        ticks.append(tick)
        tick = schedule.next_after(tick)
    return ticks


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --- next ticks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # Five fields, minute first.
        pytest.param("* * * * *", utc(2026, 1, 1, 0, 1), id="every-minute"),
        pytest.param("*/5 * * * *", utc(2026, 1, 1, 0, 5), id="every-5-minutes"),
        pytest.param("5/15 * * * *", utc(2026, 1, 1, 0, 5), id="start-slash-step"),
        pytest.param("0 * * * *", utc(2026, 1, 1, 1, 0), id="top-of-hour"),
        pytest.param("0 0 * * *", utc(2026, 1, 2), id="midnight"),
        pytest.param("30 9 * * 1-5", utc(2026, 1, 1, 9, 30), id="weekdays-range"),
        pytest.param("30 9 * * MON-fri", utc(2026, 1, 1, 9, 30), id="weekday-names"),
        pytest.param("0 0 * * sat,SUN", utc(2026, 1, 3), id="weekend-list"),
        pytest.param("0 12 ? * MON", utc(2026, 1, 5, 12), id="question-mark-dom"),
        pytest.param("0 12 1 * ?", utc(2026, 1, 1, 12), id="question-mark-dow"),
        pytest.param("0 0 1 jan *", utc(2027, 1, 1), id="month-name"),
        pytest.param("0 0 1 * 1", utc(2026, 1, 5), id="dom-or-dow"),
        pytest.param("0 0 29 2 *", utc(2028, 2, 29), id="leap-day"),
        pytest.param("0 8-10/2,22 * * *", utc(2026, 1, 1, 8), id="range-step-list"),
        # croniter reads an equal range "1-1" as the whole cycle; robfig as hour 1 alone.
        pytest.param("0 1-1 * * *", utc(2026, 1, 1, 1), id="equal-range"),
        pytest.param("0 1-1/2 * * *", utc(2026, 1, 1, 1), id="equal-range-step"),
        # Six fields: a leading seconds field.
        pytest.param("* * * * * *", utc(2026, 1, 1, 0, 0, 1), id="every-second"),
        pytest.param("*/10 * * * * *", utc(2026, 1, 1, 0, 0, 10), id="every-10-seconds"),
        pytest.param("30 15 10 * * *", utc(2026, 1, 1, 10, 15, 30), id="seconds-first"),
        pytest.param("0 0 12 ? * MON", utc(2026, 1, 5, 12), id="six-field-question-mark"),
        pytest.param("0 */5 * * * *", utc(2026, 1, 1, 0, 5), id="six-field-zero-seconds"),
        # Descriptors.
        pytest.param("@yearly", utc(2027, 1, 1), id="yearly"),
        pytest.param("@annually", utc(2027, 1, 1), id="annually"),
        pytest.param("@monthly", utc(2026, 2, 1), id="monthly"),
        pytest.param("@weekly", utc(2026, 1, 4), id="weekly"),
        pytest.param("@daily", utc(2026, 1, 2), id="daily"),
        pytest.param("@midnight", utc(2026, 1, 2), id="midnight-descriptor"),
        pytest.param("@hourly", utc(2026, 1, 1, 1), id="hourly"),
        pytest.param("@DAILY", utc(2026, 1, 2), id="descriptor-any-case"),
        # @every: multiples of the interval since the Unix epoch. START is 20454 days after
        # the epoch, a multiple of 1h30m, 5s, 90s and 24h; 11 minutes is 660 s and
        # 1767225600 / 660 = 2677614.5..., so the next multiple is 300 s after START.
        pytest.param("@every 1h30m", utc(2026, 1, 1, 1, 30), id="every-1h30m"),
        pytest.param("@every 5s", utc(2026, 1, 1, 0, 0, 5), id="every-5s"),
        pytest.param("@every 90s", utc(2026, 1, 1, 0, 1, 30), id="every-90s"),
        pytest.param("@every 24h", utc(2026, 1, 2), id="every-24h"),
        pytest.param("@every 11m", utc(2026, 1, 1, 0, 5), id="every-11m-off-grid"),
        pytest.param("@every 2000ms", utc(2026, 1, 1, 0, 0, 2), id="every-whole-ms"),
        # Surrounding and repeated whitespace is not significant.
        pytest.param("  */5   *  * * *  ", utc(2026, 1, 1, 0, 5), id="whitespace"),
    ],
)
def test_next_after(spec: str, expected: datetime) -> None:
    tick = parse_cron_spec(spec).next_after(START)
    assert tick == expected
    assert tick.tzinfo is UTC


@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        pytest.param("*/5 * * * *", utc(2026, 1, 1, 0, 5), utc(2026, 1, 1, 0, 10), id="on-tick"),
        pytest.param(
            "*/5 * * * *",
            datetime(2026, 1, 1, 0, 4, 59, 999_999, tzinfo=UTC),
            utc(2026, 1, 1, 0, 5),
            id="just-before-tick",
        ),
        pytest.param(
            "*/5 * * * *",
            datetime(2026, 1, 1, 0, 5, 0, 1, tzinfo=UTC),
            utc(2026, 1, 1, 0, 10),
            id="just-after-tick",
        ),
        pytest.param(
            "* * * * * *",
            datetime(2026, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC),
            utc(2026, 1, 1, 0, 0, 1),
            id="sub-second-after",
        ),
        pytest.param("@every 5s", utc(2026, 1, 1, 0, 0, 5), utc(2026, 1, 1, 0, 0, 10), id="every"),
        pytest.param(
            "@every 5s",
            datetime(2026, 1, 1, 0, 0, 4, 999_999, tzinfo=UTC),
            utc(2026, 1, 1, 0, 0, 5),
            id="every-just-before",
        ),
    ],
)
def test_next_after_is_strictly_after(spec: str, after: datetime, expected: datetime) -> None:
    assert parse_cron_spec(spec).next_after(after) == expected


# --- time zones ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "tz", "after", "expected"),
    [
        pytest.param("30 9 * * *", NEW_YORK, START, utc(2026, 1, 1, 14, 30), id="new-york-est"),
        pytest.param(
            "30 9 * * *", NEW_YORK, utc(2026, 7, 1), utc(2026, 7, 1, 13, 30), id="new-york-edt"
        ),
        pytest.param(
            "0 0 * * *", ZoneInfo("Europe/Paris"), START, utc(2026, 1, 1, 23), id="paris-midnight"
        ),
        pytest.param(
            "0 9 * * *",
            timezone(timedelta(hours=5, minutes=30)),
            START,
            utc(2026, 1, 1, 3, 30),
            id="fixed-offset",
        ),
        pytest.param(
            "@daily", ZoneInfo("Asia/Tokyo"), START, utc(2026, 1, 1, 15), id="descriptor-tokyo"
        ),
        # @every ignores the time zone: its grid is anchored at the Unix epoch.
        pytest.param(
            "@every 1h30m", NEW_YORK, START, utc(2026, 1, 1, 1, 30), id="every-ignores-tz"
        ),
    ],
)
def test_time_zone(spec: str, tz: ZoneInfo | timezone, after: datetime, expected: datetime) -> None:
    schedule = parse_cron_spec(spec, tz=tz)
    assert schedule.tz is tz
    tick = schedule.next_after(after)
    assert tick == expected
    assert tick.tzinfo is UTC


def test_default_time_zone_is_utc() -> None:
    assert parse_cron_spec("0 0 * * *").tz is UTC
    assert parse_cron_spec("0 0 * * *", tz=None).tz is UTC


def test_after_in_another_zone_gives_the_same_instant() -> None:
    schedule = parse_cron_spec("0 12 * * *")
    after = datetime(2026, 1, 1, 9, 0, tzinfo=NEW_YORK)  # 14:00 UTC
    assert schedule.next_after(after) == utc(2026, 1, 2, 12)


def test_dst_spring_forward_fires_after_the_gap() -> None:
    # 02:30 does not exist in New York on 2026-03-08: croniter fires at 03:00 EDT.
    schedule = parse_cron_spec("30 2 * * *", tz=NEW_YORK)
    ticks = list(ticks_between(schedule, utc(2026, 3, 7, 12), utc(2026, 3, 9, 12)))
    assert ticks == [utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]


def test_dst_fall_back_fires_on_both_occurrences() -> None:
    # 01:30 happens twice in New York on 2026-11-01 (EDT, then EST): croniter fires twice.
    schedule = parse_cron_spec("30 1 * * *", tz=NEW_YORK)
    ticks = list(ticks_between(schedule, utc(2026, 10, 31, 12), utc(2026, 11, 2, 12)))
    assert ticks == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 30), utc(2026, 11, 2, 6, 30)]


def test_time_zone_must_be_a_tzinfo() -> None:
    with pytest.raises(ConfigurationError, match=r"tz must be a datetime\.tzinfo"):
        parse_cron_spec("* * * * *", tz="Europe/Paris")  # type: ignore[arg-type]


# --- invalid specs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("   ", "empty", id="blank"),
        pytest.param("garbage", "1 field;", id="garbage"),
        pytest.param("* * * *", "4 fields", id="four-fields"),
        pytest.param("* * * * * * *", "7 fields", id="seven-fields"),
        pytest.param("60 * * * *", "minute field '60' is out of range", id="minute-60"),
        pytest.param("* 24 * * *", "hour field '24' is out of range", id="hour-24"),
        pytest.param("0 0 0 * *", "day-of-month field '0' is out of range", id="dom-0"),
        pytest.param("0 0 32 * *", "day-of-month field '32' is out of range", id="dom-32"),
        pytest.param("0 0 * 13 *", "month field '13' is out of range", id="month-13"),
        pytest.param("0 0 * * 7", "day-of-week field '7' is out of range", id="dow-7"),
        pytest.param("60 * * * * *", "second field '60' is out of range", id="second-60"),
        pytest.param("a b c d e", "minute field 'a'", id="letters"),
        pytest.param("0 0 * * jan", "day-of-week field 'jan'", id="month-name-in-dow"),
        pytest.param("0 0 * mon *", "month field 'mon'", id="day-name-in-month"),
        pytest.param("? * * * *", "'?' is only allowed", id="question-mark-minute"),
        pytest.param("0 0 ?/2 * *", "'?' cannot take a step", id="question-mark-step"),
        pytest.param("*/0 * * * *", "step of 0", id="step-0"),
        pytest.param("5-1 * * * *", "runs backwards", id="backwards-range"),
        pytest.param("0 0 * * FRI-MON", "runs backwards", id="wrap-around-days"),
        pytest.param("1-2-3 * * * *", "is not a number, range, step or list", id="two-dashes"),
        pytest.param("*/2/3 * * * *", "is not a number, range, step or list", id="two-slashes"),
        pytest.param("1,,2 * * * *", "is not a number, range, step or list", id="empty-item"),
        pytest.param("0 0 L * *", "day-of-month field 'L'", id="croniter-last-day"),
        pytest.param("0 0 * * 5#2", "day-of-week field '5#2'", id="croniter-nth-weekday"),
        pytest.param("H * * * *", "minute field 'H'", id="croniter-hash"),
        pytest.param("R * * * *", "minute field 'R'", id="croniter-random"),
        pytest.param("TZ=UTC 0 0 * * *", "second field 'TZ=UTC'", id="robfig-tz-prefix"),
        pytest.param("0 0 30 2 *", "never fires", id="february-30"),
        pytest.param("0 0 31 4,6,9,11 *", "never fires", id="31st-of-short-months"),
        pytest.param("@often", "unknown descriptor '@often'", id="unknown-descriptor"),
        pytest.param("@daily 5", "takes no arguments", id="descriptor-with-argument"),
        pytest.param("@every", "exactly one Go duration", id="every-without-duration"),
        pytest.param("@every 1h 30m", "exactly one Go duration", id="every-two-words"),
        pytest.param("@every banana", "invalid duration 'banana'", id="every-garbage"),
        pytest.param("@every 90", "missing unit", id="every-no-unit"),
        pytest.param("@every 500ms", "at least one second", id="every-sub-second"),
        pytest.param("@every 0s", "at least one second", id="every-zero"),
        pytest.param("@every 0", "at least one second", id="every-bare-zero"),
        pytest.param("@every -1h", "at least one second", id="every-negative"),
        pytest.param("@every 1.5s", "whole number of seconds", id="every-fraction"),
    ],
)
def test_invalid_spec(spec: str, reason: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_cron_spec(spec)
    message = str(caught.value)
    assert repr(spec) in message
    assert reason in message


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'@often'"):
        parse_cron_spec("@often")


def test_spec_must_be_a_string() -> None:
    with pytest.raises(ConfigurationError, match="must be a str"):
        parse_cron_spec(5)  # type: ignore[arg-type]


def test_direct_construction_validates_the_spec() -> None:
    with pytest.raises(ConfigurationError, match="'nope'"):
        CronSchedule(spec="nope", description="x", queue_name="x")


def test_parse_cron_spec_translates_the_spec_once(monkeypatch: pytest.MonkeyPatch) -> None:
    translate = _cron_schedule._translate
    calls: list[str] = []

    def counting(spec: str) -> object:
        calls.append(spec)
        return translate(spec)

    monkeypatch.setattr(_cron_schedule, "_translate", counting)
    schedule = parse_cron_spec("*/5 * * * *")
    assert calls == ["*/5 * * * *"]
    assert schedule.next_after(START) == START + timedelta(minutes=5)


def test_next_after_refuses_a_naive_datetime() -> None:
    schedule = parse_cron_spec("* * * * *")
    with pytest.raises(ValueError, match="after must be a timezone-aware datetime"):
        schedule.next_after(datetime(2026, 1, 1))


# --- @every --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "interval"),
    [
        pytest.param("@every 7s", timedelta(seconds=7), id="7s"),
        pytest.param("@every 1h30m", timedelta(minutes=90), id="1h30m"),
        pytest.param("@every 11m", timedelta(minutes=11), id="11m"),
        pytest.param("@every 1000h", timedelta(hours=1000), id="1000h"),
    ],
)
def test_every_ticks_lie_on_the_epoch_grid(spec: str, interval: timedelta) -> None:
    schedule = parse_cron_spec(spec)
    other_process = parse_cron_spec(spec)
    afters = [
        START,
        START + timedelta(seconds=1),
        START + timedelta(minutes=17, microseconds=3),
        utc(2031, 6, 15, 13, 47, 12),
        utc(1969, 12, 31, 23, 59, 59),
    ]
    for after in afters:
        tick = schedule.next_after(after)
        assert (tick - EPOCH) % interval == timedelta(0)
        assert after < tick <= after + interval
        # Whoever computes it, whenever it started, gets the same tick.
        assert other_process.next_after(after) == tick
        assert schedule.next_after(tick - interval / 2) == tick


def test_every_grids_agree_across_start_times() -> None:
    schedule = parse_cron_spec("@every 1h30m")
    early = list(ticks_between(schedule, utc(2026, 1, 1, 0, 10), utc(2026, 1, 1, 6)))
    late = list(ticks_between(schedule, utc(2026, 1, 1, 2, 59), utc(2026, 1, 1, 6)))
    assert early == [
        utc(2026, 1, 1, 1, 30),
        utc(2026, 1, 1, 3),
        utc(2026, 1, 1, 4, 30),
        utc(2026, 1, 1, 6),
    ]
    assert late == early[1:]


# --- ticks_between -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "start", "end", "expected"),
    [
        pytest.param(
            "*/15 * * * *",
            START,
            utc(2026, 1, 1, 1),
            [
                utc(2026, 1, 1, 0, 15),
                utc(2026, 1, 1, 0, 30),
                utc(2026, 1, 1, 0, 45),
                utc(2026, 1, 1, 1),
            ],
            id="start-excluded-end-included",
        ),
        pytest.param(
            "*/20 * * * * *",
            utc(2026, 1, 1, 0, 0, 59),
            utc(2026, 1, 1, 0, 2),
            [
                utc(2026, 1, 1, 0, 1),
                utc(2026, 1, 1, 0, 1, 20),
                utc(2026, 1, 1, 0, 1, 40),
                utc(2026, 1, 1, 0, 2),
            ],
            id="seconds",
        ),
        pytest.param(
            "@every 20s",
            utc(2026, 1, 1, 0, 0, 59),
            utc(2026, 1, 1, 0, 1, 50),
            [utc(2026, 1, 1, 0, 1), utc(2026, 1, 1, 0, 1, 20), utc(2026, 1, 1, 0, 1, 40)],
            id="every",
        ),
        pytest.param("@daily", START, utc(2026, 1, 1, 23, 59), [], id="none-in-range"),
        pytest.param("* * * * *", utc(2026, 1, 1, 1), START, [], id="end-before-start"),
        pytest.param("* * * * *", START, START, [], id="empty-interval"),
    ],
)
def test_ticks_between(spec: str, start: datetime, end: datetime, expected: list[datetime]) -> None:
    assert ticks_between(parse_cron_spec(spec), start, end) == expected


# --- descriptions and queue names ----------------------------------------------------------

# Expected queue names are what Go neoq computes, derived by reading go-cron-descriptor
# (jsuar/go-cron-descriptor: sentence case, 12-hour clock, "%02d:%02s" times so hour 0 is
# "00:00 AM", "at 0 minutes past the hour" dropped only when followed by ", ") and
# iancoleman/strcase's ToSnake, then stripping [^a-zA-Z0-9_]. Go neoq cannot describe
# descriptors or @every (go-cron-descriptor needs five fields): for those the expected values
# follow this project's rules (a descriptor is named like its five-field equivalent;
# "@every <d>" gives "every_<d>").
QUEUE_NAMES = [
    # go-cron-descriptor's own tests fix the wording of these.
    pytest.param("* * * * * *", "every_second", id="every-second"),
    pytest.param("* * * * *", "every_minute", id="every-minute"),
    pytest.param("*/10 * * * *", "every_10_minutes", id="every-10-minutes"),
    pytest.param("0 2 * * *", "at_0200_am", id="at-2am"),
    pytest.param("0 5,17 * * *", "at_0500_am_and_0500_pm", id="hour-list"),
    pytest.param("0 17 * * sun", "at_0500_pm_only_on_sunday", id="sunday"),
    pytest.param("0 */4 * * *", "every_4_hours", id="every-4-hours"),
    pytest.param(
        "0 4,17 * * sun,mon",
        "at_0400_am_and_0500_pm_only_on_sunday_and_monday",
        id="hours-and-days",
    ),
    pytest.param(
        "* * * jan,may,aug *", "every_minute_only_in_january_may_and_august", id="month-list"
    ),
    # Derived by reading the Go code.
    pytest.param("*/10 * * * * *", "every_10_seconds", id="every-10-seconds"),
    pytest.param("30 * * * * *", "at_30_seconds_past_the_minute", id="at-30-seconds"),
    pytest.param("*/5 * * * *", "every_5_minutes", id="every-5-minutes"),
    # Hour 0 is "00:00 AM" in Go (Python's cron-descriptor says "12:00 AM").
    pytest.param("0 0 * * *", "at_0000_am", id="midnight"),
    pytest.param("0 12 * * *", "at_1200_pm", id="noon"),
    pytest.param("15 14 1 * *", "at_0215_pm_on_day_1_of_the_month", id="day-of-month"),
    pytest.param("30 9 * * 1-5", "at_0930_am_monday_through_friday", id="weekdays"),
    # The seconds field "0" disappears: same description as the five-field spec.
    pytest.param("0 30 9 * * MON-FRI", "at_0930_am_monday_through_friday", id="six-fields"),
    pytest.param("5 4 * * sun", "at_0405_am_only_on_sunday", id="lowercase-day-name"),
    pytest.param("0 8,12,16 * * *", "at_0800_am_1200_pm_and_0400_pm", id="three-hours"),
    pytest.param("0 0 1,15 * *", "at_0000_am_on_day_1_and_15_of_the_month", id="dom-list"),
    pytest.param("0 0 * * 1,3,5", "at_0000_am_only_on_monday_wednesday_and_friday", id="dow-list"),
    pytest.param("0 0 * 1-3 *", "at_0000_am_january_through_march", id="month-range"),
    pytest.param("0 0 1-15 * *", "at_0000_am_between_day_1_and_15_of_the_month", id="dom-range"),
    pytest.param("0 0 0 * JAN,JUL ?", "at_0000_am_only_in_january_and_july", id="question-mark"),
    pytest.param("1,2,3 * * * *", "at_1_2_and_3_minutes_past_the_hour", id="minute-list"),
    pytest.param(
        "5-10 11 * * *", "every_minute_between_1105_am_and_1110_am", id="minute-range-in-hour"
    ),
    pytest.param("0 0 0 */2 * *", "at_0000_am_every_2_days", id="dom-step"),
    # Go keeps "at 0 minutes past the hour" when nothing follows it ("Every hour" in Python).
    pytest.param("0 * * * *", "at_0_minutes_past_the_hour", id="top-of-hour"),
    pytest.param("0 */2 * * *", "every_2_hours", id="every-2-hours"),
    # Go: "every minute, at 03:00 AM" (Python rewrites the hour as the range 3-3).
    pytest.param("* 3 * * *", "every_minute_at_0300_am", id="every-minute-at-3"),
    # Go: hour ranges read "09:00 AM through 05:59 PM" (Python: "between ... and ...").
    pytest.param("*/15 9-17 * * *", "every_15_minutes_0900_am_through_0559_pm", id="hour-range"),
    # Go drops "at 0 minutes past the hour, " even at the start, leaving a description that
    # starts with a digit.
    pytest.param(
        "0 9-17 * * MON-FRI",
        "0900_am_through_0559_pm_monday_through_friday",
        id="office-hours",
    ),
    # Go says "only on" even when day-of-month is restricted too (Python: "or on").
    pytest.param("0 0 1 * 1", "at_0000_am_on_day_1_of_the_month_only_on_monday", id="dom-and-dow"),
    # Go's minute and second ranges begin with ", ", so do the description and, after
    # ToSnake, the queue name. Unsure only in that it looks unintended; the code is clear.
    pytest.param("0-10 * * * *", "_minutes_0_through_10_past_the_hour", id="minute-range"),
    pytest.param("5-50 * * * * *", "_seconds_5_through_50_past_the_minute", id="second-range"),
    # Descriptors: named like their five-field equivalents.
    pytest.param("@yearly", "at_0000_am_on_day_1_of_the_month_only_in_january", id="yearly"),
    pytest.param("@annually", "at_0000_am_on_day_1_of_the_month_only_in_january", id="annually"),
    pytest.param("@monthly", "at_0000_am_on_day_1_of_the_month", id="monthly"),
    pytest.param("@weekly", "at_0000_am_only_on_sunday", id="weekly"),
    pytest.param("@daily", "at_0000_am", id="daily"),
    pytest.param("@midnight", "at_0000_am", id="midnight-descriptor"),
    pytest.param("@hourly", "at_0_minutes_past_the_hour", id="hourly"),
    # @every: the duration as written, lowercased ("." -> "_", micro sign -> "u").
    pytest.param("@every 1h30m", "every_1h30m", id="every-1h30m"),
    pytest.param("@every 5s", "every_5s", id="every-5s"),
    pytest.param("@every 1.5h", "every_1_5h", id="every-fraction-of-hour"),
    pytest.param("@every 1000000µs", "every_1000000us", id="every-micro-sign"),
    # A known difference: Go says "every 4 seconds, starting at 10"; Python cron-descriptor
    # says "..., starting at 10 seconds past the minute" and we do not rewrite it.
    pytest.param(
        "10/4 * * * * *",
        "every_4_seconds_starting_at_10",
        id="known-difference-start-offset",
        marks=pytest.mark.xfail(reason="Python cron-descriptor words start offsets differently"),
    ),
]


@pytest.mark.parametrize(("spec", "queue_name"), QUEUE_NAMES)
def test_queue_name(spec: str, queue_name: str) -> None:
    schedule = parse_cron_spec(spec)
    assert schedule.queue_name == queue_name
    if not spec.startswith("@every"):
        assert derive_queue_name(schedule.description) == queue_name


@pytest.mark.parametrize(
    ("spec", "description"),
    [
        pytest.param("* * * * * *", "Every second", id="every-second"),
        pytest.param("0 0 * * *", "At 00:00 AM", id="midnight"),
        pytest.param("@daily", "At 00:00 AM", id="daily"),
        pytest.param("30 9 * * 1-5", "At 09:30 AM, Monday through Friday", id="weekdays"),
        pytest.param("0 * * * *", "At 0 minutes past the hour", id="top-of-hour"),
        pytest.param("0 13 * * *", "At 01:00 PM", id="afternoon"),
        pytest.param("15 30 0 * * *", "At 00:30:15 AM", id="with-seconds"),
        pytest.param("@every 1h30m", "Every 1h30m", id="every"),
        pytest.param("@every  90s ", "Every 90s", id="every-whitespace"),
    ],
)
def test_description(spec: str, description: str) -> None:
    assert parse_cron_spec(spec).description == description


@pytest.mark.parametrize(
    ("description", "queue_name"),
    [
        # iancoleman/strcase's ToSnake test cases (all already in [a-zA-Z0-9_]).
        pytest.param("testCase", "test_case", id="camel"),
        pytest.param("TestCase", "test_case", id="pascal"),
        pytest.param(" Test Case ", "test_case", id="spaces"),
        pytest.param("ManyManyWords", "many_many_words", id="many-words"),
        pytest.param("AnyKind of_string", "any_kind_of_string", id="mixed"),
        pytest.param("numbers2and55with000", "numbers_2_and_55_with_000", id="numbers"),
        pytest.param("JSONData", "json_data", id="acronym"),
        pytest.param("userID", "user_id", id="trailing-acronym"),
        pytest.param("AAAbbb", "aa_abbb", id="caps-then-lower"),
        pytest.param("1A2", "1_a_2", id="digit-cap-digit"),
        pytest.param("A1A2A3", "a_1_a_2_a_3", id="alternating"),
        pytest.param("AB1 AB2 AB3", "ab_1_ab_2_ab_3", id="alternating-words"),
        pytest.param("", "", id="empty"),
        # Then StripNonAlphanum.
        pytest.param("Every second", "every_second", id="every-second"),
        pytest.param("At 12:00 AM, only on Monday", "at_1200_am_only_on_monday", id="punctuation"),
        pytest.param("Every 1h30m", "every_1_h_30_m", id="duration-through-strcase"),
        pytest.param("Day-of-week 5.5", "day_of_week_5_5", id="hyphen-and-dot"),
        pytest.param("Ünïcode: é", "ncode_", id="non-ascii-dropped"),
    ],
)
def test_derive_queue_name(description: str, queue_name: str) -> None:
    assert derive_queue_name(description) == queue_name


# --- the dataclass -------------------------------------------------------------------------


def test_schedule_keeps_the_spec_as_given_and_is_frozen() -> None:
    schedule = parse_cron_spec("  */5 * * * *  ")
    assert schedule.spec == "  */5 * * * *  "
    assert schedule.description == "Every 5 minutes"
    assert schedule.queue_name == "every_5_minutes"
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.spec = "* * * * *"  # type: ignore[misc]


def test_schedules_compare_and_hash_by_their_fields() -> None:
    first = parse_cron_spec("30 9 * * *", tz=NEW_YORK)
    second = parse_cron_spec("30 9 * * *", tz=NEW_YORK)
    assert first == second
    assert hash(first) == hash(second)
    assert first != parse_cron_spec("30 9 * * *")
    assert "_cron_expr" not in repr(first)
