"""Prometheus metrics: counters, histograms and gauges on both backends, the
extra's absence, and the worker's ``--metrics-port`` endpoint.

Each test registers the metrics on a ``CollectorRegistry`` of its own, so
tests never see each other's counts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from prometheus_client import CollectorRegistry

from neoq_anyio import ConfigurationError, Handler, Job, open_backend
from neoq_anyio._metrics import serve_metrics
from neoq_anyio.testing import drain

from .conftest import wait_until
from .test_processing import FAST

if TYPE_CHECKING:
    from neoq_anyio._models import Execution


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.mark.parametrize("execution", ["transaction", "lease"])
async def test_counters_and_histograms_follow_the_jobs(
    connection_string: str, execution: Execution
) -> None:
    registry = CollectorRegistry()

    async def handle(job: Job) -> None:
        assert job.payload is not None
        if job.payload["fail"]:
            raise ValueError("no")

    with anyio.fail_after(15):
        async with open_backend(connection_string, metrics=registry, **FAST) as nq:
            await nq.enqueue(Job("m", {"fail": False, "n": 1}))
            await nq.enqueue(Job("m", {"fail": False, "n": 2}))
            await nq.enqueue(Job("m", {"fail": True}, max_retries=0))
            await nq.start(Handler("m", handle, execution=execution))
            await drain(nq)
            assert _value(registry, "neoq_jobs_enqueued_total", queue="m") == 3
            assert _value(registry, "neoq_jobs_processed_total", queue="m") == 2
            assert _value(registry, "neoq_jobs_failed_total", queue="m") == 1
            assert _value(registry, "neoq_jobs_dead_total", queue="m") == 1
            assert _value(registry, "neoq_job_duration_seconds_count", queue="m") == 3
            assert _value(registry, "neoq_job_wait_seconds_count", queue="m") == 3
            waited = _value(registry, "neoq_job_wait_seconds_sum", queue="m")
            assert waited is not None
            assert waited >= 0
            assert _value(registry, "neoq_jobs_in_flight", queue="m") == 0


async def test_gauges_show_jobs_in_flight_queue_counts_and_the_pool(
    connection_string: str, backend_kind: str
) -> None:
    registry = CollectorRegistry()
    started = anyio.Event()
    release = anyio.Event()

    async def handle(job: Job) -> None:
        started.set()
        await release.wait()

    with anyio.fail_after(15):
        async with open_backend(connection_string, metrics=registry, **FAST) as nq:
            await nq.start(Handler("busy", handle))
            for n in range(2):
                await nq.enqueue(Job("idle", {"n": n}))  # no handler: they stay due
            await nq.enqueue(Job("busy"))
            await started.wait()
            assert _value(registry, "neoq_jobs_in_flight", queue="busy") == 1
            # The queue counts come from a snapshot a scrape asks for: the
            # first scrape finds none, a later one the counts.
            await wait_until(
                lambda: _value(registry, "neoq_queue_jobs", queue="idle", status="due") == 2
            )
            assert _value(registry, "neoq_queue_jobs", queue="idle", status="dead") == 0
            in_use = _value(registry, "neoq_pool_connections", state="in_use")
            if backend_kind == "postgres":
                assert in_use is not None
                assert in_use >= 1  # the busy job's transaction
                assert (_value(registry, "neoq_pool_max_connections") or 0) >= 1
            else:
                assert in_use is None  # no pool in memory
            release.set()
            await drain(nq)
            assert _value(registry, "neoq_jobs_in_flight", queue="busy") == 0
    # Closed: its gauges are gone from the registry.
    assert _value(registry, "neoq_queue_jobs", queue="idle", status="due") is None


async def test_backends_opened_in_turn_share_a_registry() -> None:
    registry = CollectorRegistry()
    for _ in range(2):
        async with open_backend(metrics=registry) as nq:
            await nq.enqueue(Job("again"))
    assert _value(registry, "neoq_jobs_enqueued_total", queue="again") == 2


async def test_metrics_refuse_what_is_not_a_registry() -> None:
    with pytest.raises(ConfigurationError, match="CollectorRegistry"):
        async with open_backend(metrics="yes"):  # type: ignore[arg-type]
            pass


def test_without_the_extras_asking_for_them_says_what_to_install() -> None:
    """``import neoq_anyio`` imports neither package; asking for metrics or
    tracing where they cannot be imported raises ConfigurationError."""
    script = textwrap.dedent(
        """
        import sys

        import anyio

        import neoq_anyio

        loaded = [m for m in sys.modules if m.startswith(("prometheus_client", "opentelemetry"))]
        assert not loaded, loaded
        # None in sys.modules: what Python does for a package that is not there.
        sys.modules["prometheus_client"] = None
        sys.modules["opentelemetry"] = None
        sys.modules["opentelemetry.trace"] = None


        async def main() -> None:
            for option in ("metrics", "tracing"):
                try:
                    async with neoq_anyio.open_backend(**{option: True}):
                        pass
                except neoq_anyio.ConfigurationError as exc:
                    print(exc)


        anyio.run(main)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines() == [
        "metrics need prometheus_client: pip install 'neoq_anyio[prometheus]'",
        "tracing needs opentelemetry-api: pip install 'neoq_anyio[otel]'",
    ]


async def _get(port: int, path: str) -> tuple[str, str]:
    """An HTTP GET to 127.0.0.1:port; the status line and the body."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        try:
            while True:
                data += await stream.receive()
        except anyio.EndOfStream:
            pass
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


async def test_serve_metrics_answers_scrapes_until_cancelled() -> None:
    registry = CollectorRegistry()
    with anyio.fail_after(10):
        async with open_backend(metrics=registry) as nq:
            await nq.enqueue(Job("served"))
            async with anyio.create_task_group() as tg:
                port = await tg.start(serve_metrics, registry, "127.0.0.1", 0)
                status, body = await _get(port, "/metrics")
                assert status == "HTTP/1.1 200 OK"
                assert 'neoq_jobs_enqueued_total{queue="served"} 1.0' in body
                status, _ = await _get(port, "/elsewhere")
                assert status == "HTTP/1.1 404 Not Found"
                tg.cancel_scope.cancel()
        with pytest.raises(OSError, match=r"(?i)refused|connection attempts failed"):
            await anyio.connect_tcp("127.0.0.1", port)


APP = """
from neoq_anyio import Handler, Job


async def run(job: Job) -> None:
    pass


async def setup(nq) -> None:
    await nq.start(Handler("scraped", run))
"""


async def test_worker_serves_metrics_on_metrics_port(
    tmp_path: Path, dsn: str, anyio_backend_name: str
) -> None:
    (tmp_path / "metrics_app.py").write_text(APP)
    async with open_backend(dsn) as nq:
        await nq.enqueue(Job("scraped"))
    command = [
        *(sys.executable, "-m", "neoq_anyio", "worker", "metrics_app:setup"),
        *("--loop", anyio_backend_name, "--metrics-port", "0"),
    ]
    env = {**os.environ, "NEOQ_DSN": dsn, "PYTHONUNBUFFERED": "1"}
    process = await anyio.open_process(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        with anyio.fail_after(30):
            log = ""
            async for chunk in process.stderr:
                log += chunk.decode(errors="replace")
                if "/metrics" in log:
                    break
            line = next(x for x in log.splitlines() if "serving metrics on" in x)
            port = int(line.rsplit(":", 1)[1].split("/")[0])

            async def processed() -> bool:
                _, body = await _get(port, "/metrics")
                return 'neoq_jobs_processed_total{queue="scraped"} 1.0' in body

            await wait_until(processed)
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.move_on_after(5, shield=True):
                await process.wait()
