"""Prometheus metrics (extra ``neoq_anyio[prometheus]``): ``open_backend(..., metrics=True)``.

Counters, histograms and jobs in flight are counted by the observer hooks
(``_observe``) as jobs are enqueued and run, in plain integers (see
``_Metrics``); other gauges are read when Prometheus scrapes: the pool's
connections, and the queues' job counts. Those counts take
a query (``queue_stats()``), so a scrape never waits for one: it reads a
snapshot that a service in the backend's task group refreshes after a
scrape asked for it, at most every ``_REFRESH_SECONDS``. A process nobody
scrapes runs no query.

One ``_Metrics`` per registry holds the counts and is its collector:
backends opened one after another (or side by side) with the same registry
share it, as registering a metric name twice would fail, and counters must
not start again from zero when a backend is reopened. Counters add up across those
backends; the gauges sum the backends' in-process figures, and for queue
counts (the whole database's) take the largest snapshot of a queue.

``serve_metrics`` is the worker command's ``--metrics-port`` endpoint: a
small HTTP server in the caller's task group, so it stops with the worker
(``prometheus_client.start_http_server`` would run in a daemon thread that
outlives it).
"""

from __future__ import annotations

import contextlib
import importlib
import time
import weakref
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketAttribute

from ._control import Discard
from ._exceptions import ConfigurationError, DatabaseError, PoolTimeoutError
from ._observe import Observer

# Missing, MetricsObserver() says what to install (load_prometheus).
with contextlib.suppress(ImportError):
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

if TYPE_CHECKING:
    from collections.abc import Iterator

    from anyio.abc import SocketStream, TaskStatus
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from ._backend import Backend
    from ._models import Job
    from ._outcome import Outcome

__all__ = ["MetricsObserver", "load_prometheus", "serve_metrics"]

_REFRESH_SECONDS = 5.0  # the queue counts are refreshed at most this often
_POLL_SECONDS = 0.25  # how soon after a scrape asked for it a refresh starts
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_STATUSES = ("due", "scheduled", "running", "failed", "processed", "dead")


def load_prometheus() -> Any:
    """``prometheus_client``, imported now.

    Raises:
        ConfigurationError: it is not installed.
    """
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        raise ConfigurationError(
            "metrics need prometheus_client: pip install 'neoq_anyio[prometheus]'"
        ) from None


class _Snapshot:
    """One backend's scrape-time view: its queue counts as last refreshed."""

    __slots__ = ("asked", "counts", "refreshed")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.refreshed = -1.0  # time.monotonic() of the last refresh; -1: never
        self.asked = False  # a scrape came since the last refresh


class _Histogram:
    """Counts per bucket (not cumulative; the last is +Inf), their sum."""

    __slots__ = ("bounds", "counts", "labels", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.labels = [*(repr(float(b)) for b in bounds), "+Inf"]  # the "le" labels
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, Prometheus's "le".
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        running = 0
        cumulative = []
        for label, count in zip(self.labels, self.counts, strict=True):
            running += count
            cumulative.append((label, float(running)))
        return cumulative


class _Queue:
    """One queue's counts, as jobs are enqueued and run."""

    __slots__ = (
        "dead",
        "duration",
        "enqueued",
        "failed",
        "in_flight",
        "processed",
        "snoozed",
        "wait",
    )

    def __init__(self) -> None:
        self.enqueued = self.processed = self.failed = self.dead = self.in_flight = 0
        self.snoozed = 0
        self.duration = _Histogram(_DURATION_BUCKETS)
        self.wait = _Histogram(_WAIT_BUCKETS)


class _Metrics:
    """The metrics of one registry: the counts, and the collector exposing them.

    Plain integers, not ``prometheus_client``'s metric objects, which take a
    lock per update: a job costs a few additions here, and the collector
    turns the counts into metric families when Prometheus scrapes. They are
    updated in the loop thread of the backend that runs the job; a scrape
    reads them from whichever thread it runs in (a figure a moment old is
    fine). Backends on different threads sharing a registry could, rarely,
    lose an update to a race; give each its own registry if that matters.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queues: dict[str, _Queue] = {}
        self.backends: weakref.WeakKeyDictionary[Backend, _Snapshot] = weakref.WeakKeyDictionary()
        registry.register(self)

    def queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Queue()
        return queue

    def collect(self) -> Iterator[Metric]:
        """The metrics now (``prometheus_client``'s collector protocol)."""
        queues = sorted(self.queues.items())
        for name, doc, attribute in _COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["queue"])
            for queue, counts in queues:
                counter.add_metric([queue], getattr(counts, attribute))
            yield counter
        for name, doc, attribute in _HISTOGRAMS:
            histogram = HistogramMetricFamily(name, doc, labels=["queue"])
            for queue, counts in queues:
                of = getattr(counts, attribute)
                histogram.add_metric([queue], of.buckets(), of.total)
            yield histogram
        in_flight = GaugeMetricFamily(
            "neoq_jobs_in_flight", "Jobs running now in this process.", labels=["queue"]
        )
        for queue, counts in queues:
            in_flight.add_metric([queue], counts.in_flight)
        yield in_flight
        yield from self._scraped_gauges()

    def _scraped_gauges(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "neoq_queue_jobs",
            "Jobs in the database by queue and status (refreshed at most every 5 s).",
            labels=["queue", "status"],
        )
        pool = GaugeMetricFamily(
            "neoq_pool_connections",
            "This process's pooled PostgreSQL connections by state.",
            labels=["state"],
        )
        pool_max = GaugeMetricFamily(
            "neoq_pool_max_connections", "The most connections the pool opens."
        )
        waiting = GaugeMetricFamily(
            "neoq_pool_waiting_tasks", "Tasks waiting for a pooled connection."
        )
        counts: dict[tuple[str, str], int] = {}
        idle = in_use = size = wait = 0
        pooled = False
        for backend, snapshot in list(self.backends.items()):
            snapshot.asked = True
            for key, value in snapshot.counts.items():
                counts[key] = max(counts.get(key, 0), value)
            stats = backend.statistics().pool
            if stats is not None:
                pooled = True
                idle += stats.idle
                in_use += stats.in_use
                size += stats.max_size
                wait += stats.waiting
        for (queue, status), value in sorted(counts.items()):
            jobs.add_metric([queue, status], value)
        yield jobs
        if pooled:
            pool.add_metric(["idle"], idle)
            pool.add_metric(["in_use"], in_use)
            pool_max.add_metric([], size)
            waiting.add_metric([], wait)
            yield pool
            yield pool_max
            yield waiting

    def describe(self) -> list[Metric]:
        # Nothing: the registry then calls collect() only at scrape time.
        return []


_COUNTERS = (
    ("neoq_jobs_enqueued", "Jobs enqueued by this process.", "enqueued"),
    ("neoq_jobs_processed", "Job runs that succeeded.", "processed"),
    ("neoq_jobs_failed", "Job runs that failed (retried or dead), timeouts included.", "failed"),
    (
        "neoq_jobs_dead",
        "Jobs moved to the dead jobs (out of retries, past their deadline, or discarded).",
        "dead",
    ),
    ("neoq_jobs_snoozed", "Job runs whose handler raised Snooze (due again later).", "snoozed"),
)
_HISTOGRAMS = (
    (
        "neoq_job_duration_seconds",
        "From a handler's start until its outcome is recorded.",
        "duration",
    ),
    (
        "neoq_job_wait_seconds",
        "From a job's run_after (when it came due) until its handler started.",
        "wait",
    ),
)

_BY_REGISTRY: weakref.WeakKeyDictionary[Any, _Metrics] = weakref.WeakKeyDictionary()


class MetricsObserver(Observer):
    """Feeds the Prometheus metrics of ``registry`` (default: the global one).

    Raises:
        ConfigurationError: ``prometheus_client`` is not installed, or
            ``registry`` is not a ``CollectorRegistry``.
    """

    __slots__ = ("_metrics", "_queues", "registry")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        client = load_prometheus()
        if registry is None:
            registry = client.REGISTRY
        if not isinstance(registry, client.CollectorRegistry):
            raise ConfigurationError(
                "metrics must be True, False or a prometheus_client.CollectorRegistry, "
                f"got {registry!r}"
            )
        self.registry = registry
        metrics = _BY_REGISTRY.get(registry)
        if metrics is None:
            metrics = _BY_REGISTRY[registry] = _Metrics(registry)
        self._metrics = metrics
        self._queues = metrics.queues

    def enqueue_finished(
        self, state: Any, job: Job, job_id: str | None, exc: BaseException | None
    ) -> None:
        if job_id is not None:
            self._metrics.queue(job.queue).enqueued += 1

    def tick_enqueued(self, queue: str) -> None:
        self._metrics.queue(queue).enqueued += 1

    def job_started(self, job: Job) -> Any:
        queue = self._queues.get(job.queue) or self._metrics.queue(job.queue)
        if job.run_after is not None:
            queue.wait.observe(max(0.0, time.time() - job.run_after.timestamp()))
        queue.in_flight += 1
        return time.perf_counter()

    def job_finished(self, job: Job, outcome: Outcome, state: Any) -> None:
        queue = self._queues.get(job.queue) or self._metrics.queue(job.queue)
        if state is not None:
            queue.duration.observe(time.perf_counter() - state)
            queue.in_flight -= 1
        kind = outcome.kind
        if kind == "processed":
            queue.processed += 1
            return
        if kind == "snooze":  # neither a success nor a failure
            queue.snoozed += 1
            return
        # A discard is the handler's decision, not a failed run: dead only.
        if outcome.ran and not isinstance(outcome.exc, Discard):
            queue.failed += 1
        if kind == "dead":
            queue.dead += 1

    def job_abandoned(self, job: Job, state: Any) -> None:
        self._metrics.queue(job.queue).in_flight -= 1

    async def run(
        self, backend: Backend, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep ``backend``'s queue counts fresh for scrapes, while it is open."""
        snapshot = self._metrics.backends[backend] = _Snapshot()
        task_status.started()
        try:
            while True:
                await anyio.sleep(_POLL_SECONDS)
                due = snapshot.refreshed < 0 or (
                    time.monotonic() - snapshot.refreshed >= _REFRESH_SECONDS
                )
                if not (snapshot.asked and due):
                    continue
                snapshot.asked = False
                snapshot.refreshed = time.monotonic()
                try:
                    stats = await backend.queue_stats()
                except (DatabaseError, PoolTimeoutError) as exc:
                    backend._log.warning("metrics: cannot count the queues' jobs: %s", exc)
                    continue
                snapshot.counts = {
                    (s.queue, status): getattr(s, status) for s in stats for status in _STATUSES
                }
        finally:
            self._metrics.backends.pop(backend, None)


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` (Prometheus's text format) on ``host:port`` until
    cancelled; reports the port bound (useful with port 0) once listening.

    Raises:
        OSError: the address cannot be bound.
    """
    client = load_prometheus()
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        task_status.started(listener.extra(SocketAttribute.local_port))

        async def answer(stream: SocketStream) -> None:
            async with stream:
                with anyio.move_on_after(10):
                    await _answer(stream, client, registry)

        await listener.serve(answer)


async def _answer(stream: SocketStream, client: Any, registry: CollectorRegistry) -> None:
    """One request: read its head, answer it, close (HTTP/1.0 style)."""
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        try:
            head += await stream.receive(4096)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return
        if len(head) > 16384:
            return
    method, _, rest = head.partition(b" ")
    path = rest.partition(b" ")[0].partition(b"?")[0]
    if method not in (b"GET", b"HEAD"):
        status, body, ctype = b"405 Method Not Allowed", b"use GET\n", b"text/plain"
    elif path not in (b"/metrics", b"/"):
        status, body, ctype = b"404 Not Found", b"metrics are at /metrics\n", b"text/plain"
    else:
        status, body = b"200 OK", client.generate_latest(registry)
        ctype = client.CONTENT_TYPE_LATEST.encode()
    response = (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + ctype
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + (b"" if method == b"HEAD" else body)
    )
    with contextlib.suppress(anyio.BrokenResourceError, OSError):
        await stream.send(response)
