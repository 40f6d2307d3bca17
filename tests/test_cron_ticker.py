"""The cron ticker alone, on a fast clock or trio's autojumping MockClock."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from neoq_anyio._cron import CronTicker, WallClock
from neoq_anyio._cron_schedule import parse_cron_spec
from neoq_anyio._log import default_log


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
        pytest.param(("trio", {"clock": "autojump"}), id="trio+autojump"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    name, options = request.param
    if options.get("clock") == "autojump":
        import trio.testing

        options = {"clock": trio.testing.MockClock(autojump_threshold=0)}
    return name, options


class VirtualClock(WallClock):
    """Wall time derived from AnyIO's clock, ``speed`` times faster. With trio's
    autojumping MockClock (speed 1), hours pass in no real time at all."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.base = datetime(2026, 1, 1, tzinfo=UTC)
        self.start = anyio.current_time()

    def now(self) -> datetime:
        return self.base + timedelta(seconds=(anyio.current_time() - self.start) * self.speed)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds / self.speed)


async def test_ticker_survives_a_failed_enqueue(
    anyio_backend: tuple[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    autojump = "clock" in anyio_backend[1]
    clock = VirtualClock(1.0 if autojump else 36_000.0)  # 1 h = 0.1 s when not autojumping
    seen: list[datetime] = []
    five = anyio.Event()

    async def enqueue_tick(queue: str, tick: datetime) -> bool:
        seen.append(tick)
        if len(seen) == 2:
            raise RuntimeError("database briefly down")
        if len(seen) == 5:
            five.set()
        return True

    ticker = CronTicker(
        parse_cron_spec("@hourly"),
        "q",
        enqueue_tick,
        log=default_log(),
        clock=clock,
    )
    with caplog.at_level(logging.ERROR, logger="neoq_anyio"):
        with anyio.fail_after(3600 * 10 if autojump else 10):
            async with anyio.create_task_group() as tg:
                await tg.start(ticker.run)
                await five.wait()
                tg.cancel_scope.cancel()
    hours = [t.hour for t in seen]
    if autojump:
        assert hours == [1, 2, 3, 4, 5]
    else:  # at 36,000x a busy machine may skip past the catch-up window
        assert hours == sorted(set(hours))
        assert all((t.minute, t.second) == (0, 0) for t in seen)
    assert ticker.claimed == 4
    assert any("briefly down" in r.getMessage() for r in caplog.records)


async def test_ticker_does_not_replay_missed_ticks(
    anyio_backend: tuple[str, dict[str, Any]],
) -> None:
    autojump = "clock" in anyio_backend[1]
    clock = VirtualClock(1.0 if autojump else 36_000.0)
    seen: list[datetime] = []
    one = anyio.Event()

    async def enqueue_tick(queue: str, tick: datetime) -> bool:
        seen.append(tick)
        one.set()
        return True

    ticker = CronTicker(
        parse_cron_spec("*/10 * * * *"),
        "q",
        enqueue_tick,
        log=default_log(),
        clock=clock,
    )
    with anyio.fail_after(3600 if autojump else 10):
        async with anyio.create_task_group() as tg:
            await tg.start(ticker.run)
            await one.wait()
            tg.cancel_scope.cancel()
    # Started at 00:00:00.000...: the first tick is a later one, never 00:00.
    assert seen[0] > clock.base
    assert (seen[0].minute % 10, seen[0].second) == (0, 0)
    if autojump:  # virtual time is exact: it is the very next one
        assert seen[0] == datetime(2026, 1, 1, 0, 10, tzinfo=UTC)
    # (At 36,000x, a busy machine's scheduling delay is virtual hours, past
    # the ticker's catch-up window: the first tick seen may be a later one.)
