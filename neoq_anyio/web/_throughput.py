"""Recent throughput, from the processed counts the dashboard has seen.

The backend keeps counts, not a history, so the dashboard keeps one: every
time it reads ``queue_stats()`` (each page view, and every few seconds while
a queue page is open) it records each queue's processed count. A queue's
throughput is the growth of that count over the last minute of samples, in
jobs per minute. It is honest about what it is:

* it needs two samples, so it shows nothing until the dashboard has looked
  twice (a few seconds after a page is opened);
* it is the net growth: retention deletes processed jobs as they age, so
  while pruning runs it reads low, and a count that fell gives no figure.
  The Prometheus counter ``neoq_jobs_processed_total`` is the exact rate.

Pure bookkeeping: the caller passes the time, so it is tested without
waiting.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from neoq_anyio._models import QueueStats

__all__ = ["Rate", "Throughput"]

WINDOW = 60.0  # seconds of samples a rate is measured over
_MIN_SPAN = 1.0  # seconds between the samples a rate compares, at least
_MAX_SAMPLES = 1000  # a bound on memory, whatever the request rate


@dataclass(frozen=True, slots=True)
class Rate:
    """Processed jobs per minute, and the seconds of samples it was measured over."""

    per_minute: float
    over_seconds: float


class Throughput:
    """Samples of processed counts per queue, and the rates they give."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=_MAX_SAMPLES)

    def record(self, now: float, stats: Iterable[QueueStats]) -> dict[str, Rate | None]:
        """Add a sample taken at ``now`` (monotonic seconds); each queue's rate.

        A queue gets ``None`` when no sample at least a second older knows it,
        or when its count fell in between (retention pruned processed jobs).
        """
        counts = {stat.queue: stat.processed for stat in stats}
        while self._samples and self._samples[0][0] < now - WINDOW:
            self._samples.popleft()
        rates: dict[str, Rate | None] = {}
        for queue, count in counts.items():
            rates[queue] = None
            for taken, then in self._samples:  # oldest first: the longest span wins
                span = now - taken
                if span < _MIN_SPAN:
                    break
                if queue in then:
                    grown = count - then[queue]
                    if grown >= 0:
                        rates[queue] = Rate(grown * 60.0 / span, span)
                    break
        if not self._samples or now - self._samples[-1][0] >= _MIN_SPAN:
            self._samples.append((now, counts))
        return rates
