"""OpenTelemetry tracing: a PRODUCER span per enqueue, a CONSUMER span per job
run, the job's span continuing the enqueuer's trace, on both backends.

Spans go to the SDK's ``InMemorySpanExporter`` through a ``TracerProvider``
passed to ``open_backend(tracing=...)``, so no global state is touched.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from neoq_anyio import ConfigurationError, DuplicateJobError, Handler, Job, open_backend
from neoq_anyio.testing import dead_jobs, drain, fast_forward

from .test_processing import FAST


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def _named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


@pytest.mark.parametrize("execution", ["transaction", "lease"])
async def test_job_span_continues_the_enqueuers_trace(
    connection_string: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    execution: Any,
) -> None:
    tracer = provider.get_tracer("test")
    inside: list[Any] = []
    done = anyio.Event()

    async def handle(job: Job) -> None:
        inside.append(trace.get_current_span().get_span_context())
        with tracer.start_as_current_span("handler work"):
            pass
        done.set()

    with anyio.fail_after(15):
        async with open_backend(connection_string, tracing=provider, **FAST) as nq:
            await nq.start(Handler("traced", handle, execution=execution))
            with tracer.start_as_current_span("request") as request:
                job_id = await nq.enqueue(Job("traced", {"n": 1}))
            await done.wait()
            await drain(nq)
    spans = exporter.get_finished_spans()
    [send] = _named(spans, "send traced")
    [run] = _named(spans, "process traced")
    [work] = _named(spans, "handler work")
    assert send.kind is SpanKind.PRODUCER
    assert run.kind is SpanKind.CONSUMER
    # One trace, from the request through the enqueue to the run and the handler's spans.
    trace_id = request.get_span_context().trace_id
    assert {send.context.trace_id, run.context.trace_id, work.context.trace_id} == {trace_id}
    assert send.parent is not None
    assert send.parent.span_id == request.get_span_context().span_id
    assert run.parent is not None
    assert run.parent.span_id == send.context.span_id
    assert work.parent is not None
    assert work.parent.span_id == run.context.span_id
    assert inside == [run.context]
    assert send.attributes is not None
    assert send.attributes["messaging.destination.name"] == "traced"
    assert send.attributes["messaging.message.id"] == job_id
    assert run.attributes is not None
    assert run.attributes["messaging.destination.name"] == "traced"
    assert run.attributes["messaging.message.id"] == job_id
    assert run.attributes["neoq.job.retries"] == 0
    assert run.attributes["neoq.job.outcome"] == "processed"
    assert run.status.status_code is StatusCode.UNSET


async def test_failed_runs_have_error_status_and_count_retries(
    connection_string: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    runs = 0

    async def handle(job: Job) -> None:
        nonlocal runs
        runs += 1
        raise ValueError(f"broken run {runs}")

    with anyio.fail_after(15):
        async with open_backend(connection_string, tracing=provider, **FAST) as nq:
            await nq.start(Handler("failing", handle))
            job_id = await nq.enqueue(Job("failing", max_retries=1))
            await drain(nq)  # the first run fails, its retry is due later
            await fast_forward(nq, 3600)
            await drain(nq)
            assert [j.id for j in await dead_jobs(nq)] == [job_id]
    spans = _named(exporter.get_finished_spans(), "process failing")
    [send] = _named(exporter.get_finished_spans(), "send failing")
    assert len(spans) == 2
    first, second = sorted(spans, key=lambda s: s.start_time or 0)
    for span, retries, outcome in ((first, 0, "retry"), (second, 1, "dead")):
        assert span.attributes is not None
        assert span.attributes["neoq.job.retries"] == retries
        assert span.attributes["neoq.job.outcome"] == outcome
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description is not None
        assert "ValueError: broken run" in span.status.description
        assert [e.name for e in span.events] == ["exception"]
        # Both runs, the retry too, continue the enqueue's trace.
        assert span.parent is not None
        assert span.parent.span_id == send.context.span_id


async def test_jobs_enqueued_untraced_get_a_root_span(
    dsn: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A job without a trace context (enqueued with tracing off, or by Go
    neoq) starts a trace of its own; the stored column stays NULL."""
    done = anyio.Event()

    async def handle(job: Job) -> None:
        done.set()

    with anyio.fail_after(15):
        async with open_backend(dsn, **FAST) as plain:
            await plain.enqueue(Job("untraced"))
            async with plain.connection() as conn:
                cur = await conn.execute("SELECT trace_context FROM neoq_jobs")
                assert await cur.fetchall() == [(None,)]
        async with open_backend(dsn, tracing=provider, **FAST) as nq:
            await nq.start(Handler("untraced", handle))
            await done.wait()
            await drain(nq)
    [run] = _named(exporter.get_finished_spans(), "process untraced")
    assert run.parent is None


async def test_enqueue_failure_is_recorded_on_its_span(
    connection_string: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with open_backend(connection_string, tracing=provider, **FAST) as nq:
        await nq.enqueue(Job("twice", {"n": 1}))
        with pytest.raises(DuplicateJobError):
            await nq.enqueue(Job("twice", {"n": 1}))
    first, second = sorted(
        _named(exporter.get_finished_spans(), "send twice"), key=lambda s: s.start_time or 0
    )
    assert first.status.status_code is StatusCode.UNSET
    assert second.status.status_code is StatusCode.ERROR
    assert second.attributes is not None
    assert "messaging.message.id" not in second.attributes


async def test_tracing_refuses_what_is_not_a_tracer_provider() -> None:
    with pytest.raises(ConfigurationError, match="TracerProvider"):
        async with open_backend(tracing="yes"):  # type: ignore[arg-type]
            pass
