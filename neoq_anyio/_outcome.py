"""Retry decisions: pure functions, shared by every backend."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryDecision", "backoff_seconds", "decide_failure"]


def backoff_seconds(retries: int, *, jitter: int | None = None) -> int:
    """Seconds to wait before retrying a job that failed with ``retries`` retries so far.

    Go neoq's formula (taken from Sidekiq): ``r**4 + 15 + rand(0..29) * r + 1``.
    ``jitter`` fixes the random term, for tests.
    """
    rand = random.randrange(30) if jitter is None else jitter
    return retries**4 + 15 + rand * retries + 1


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What a failed run leads to: dead, or a retry ``delay`` seconds from now."""

    dead: bool
    delay: float = 0.0


def decide_failure(retries: int, max_retries: int | None) -> RetryDecision:
    """Decide the fate of a run that failed while the job had ``retries`` retries.

    A run that fails when ``retries`` already equals ``max_retries`` moves the
    job to the dead jobs; ``max_retries=None`` (a NULL column, as Go neoq may
    write) never does.
    """
    if max_retries is not None and retries >= max_retries:
        return RetryDecision(dead=True)
    return RetryDecision(dead=False, delay=backoff_seconds(retries))
