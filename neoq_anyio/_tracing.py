"""OpenTelemetry tracing (extra ``neoq_anyio[otel]``): ``open_backend(..., tracing=True)``.

A span per enqueue (kind PRODUCER, ``send <queue>``) and per job run (kind
CONSUMER, ``process <queue>``). The enqueue injects its context with the
global propagator (W3C ``traceparent`` by default) into the job, which stores
it (the ``trace_context`` column; the in-memory backend keeps it on the job),
so the run's span is a child of the enqueue's span and continues the trace
of the request that queued the job, in whichever process runs it.

Each span is made current in the task that enqueues or runs the job, from
the hook that starts it to the one that ends it (``_observe``): spans opened
by a handler are children of its job's span. Only the API package is needed
here; what exports the spans is the application's SDK setup.

A job's span says how the run ended in ``neoq.job.outcome`` (``processed``,
``retry``, ``snooze``, ``dead``); failures set the span's status to ERROR
with the exception recorded. A ``Snooze`` or a ``Discard`` is the handler's
decision, not an error: no ERROR status (``neoq.job.snooze_seconds``, or
``neoq.job.discarded``, say which).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._control import Discard
from ._exceptions import ConfigurationError
from ._observe import Observer

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from ._models import Job
    from ._outcome import Outcome

__all__ = ["TracingObserver"]

_SYSTEM = "neoq_anyio"


def _load() -> tuple[Any, Any, Any]:
    """``opentelemetry``'s ``trace``, ``context`` and ``propagate`` modules.

    Raises:
        ConfigurationError: ``opentelemetry-api`` is not installed.
    """
    try:
        return (
            importlib.import_module("opentelemetry.trace"),
            importlib.import_module("opentelemetry.context"),
            importlib.import_module("opentelemetry.propagate"),
        )
    except ImportError:
        raise ConfigurationError(
            "tracing needs opentelemetry-api: pip install 'neoq_anyio[otel]'"
        ) from None


class TracingObserver(Observer):
    """Spans for enqueues and job runs, from ``provider``'s tracer (default:
    the global tracer provider, looked up at each span, so an SDK set up
    after the backend opened is used).

    Raises:
        ConfigurationError: ``opentelemetry-api`` is not installed, or
            ``provider`` is not a ``TracerProvider``.
    """

    __slots__ = ("_context", "_error", "_kinds", "_propagate", "_provider", "_trace")

    def __init__(self, provider: TracerProvider | None = None) -> None:
        trace, context, propagate = _load()
        if provider is not None and not isinstance(provider, trace.TracerProvider):
            raise ConfigurationError(
                f"tracing must be True, False or an opentelemetry TracerProvider, got {provider!r}"
            )
        self._trace, self._context, self._propagate = trace, context, propagate
        self._provider = provider
        self._kinds = (trace.SpanKind.PRODUCER, trace.SpanKind.CONSUMER)
        self._error = trace.StatusCode.ERROR

    def _tracer(self) -> Any:
        if self._provider is None:
            return self._trace.get_tracer("neoq_anyio")
        return self._provider.get_tracer("neoq_anyio")

    def enqueue_started(self, job: Job) -> tuple[Job, Any]:
        queue = getattr(job, "queue", None)
        span = self._tracer().start_span(
            f"send {queue}",
            kind=self._kinds[0],
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "send",
                "messaging.destination.name": str(queue),
            },
        )
        ctx = self._trace.set_span_in_context(span)
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier, context=ctx)
        token = self._context.attach(ctx)
        if carrier and hasattr(job, "_evolve"):  # a Job; anything else fails validation
            job = job._evolve(_trace_context=carrier)
        return job, (span, token)

    def enqueue_finished(
        self, state: Any, job: Job, job_id: str | None, exc: BaseException | None
    ) -> None:
        span, token = state
        self._context.detach(token)
        if job_id is not None:
            span.set_attribute("messaging.message.id", job_id)
        if exc is not None:
            span.record_exception(exc)
            span.set_status(self._error, f"{type(exc).__name__}: {exc}")
        span.end()

    def job_started(self, job: Job) -> Any:
        span = self._job_span(job)
        return span, self._context.attach(self._trace.set_span_in_context(span))

    def _job_span(self, job: Job) -> Any:
        carried = job._trace_context
        # No carried context: a root span, whatever the worker's context holds.
        parent = self._propagate.extract(carried) if carried else self._context.Context()
        return self._tracer().start_span(
            f"process {job.queue}",
            context=parent,
            kind=self._kinds[1],
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "process",
                "messaging.destination.name": job.queue,
                "messaging.message.id": job.id or "",
                "neoq.job.retries": job.retries,
            },
        )

    def job_finished(self, job: Job, outcome: Outcome, state: Any) -> None:
        if state is None:  # refused unrun: a span saying so, in the job's trace
            span = self._job_span(job)
            span.set_attribute("neoq.job.ran", False)
        else:
            span, token = state
            self._context.detach(token)
        span.set_attribute("neoq.job.outcome", outcome.kind)
        if outcome.kind != "processed":
            if outcome.kind == "snooze":  # not an error: due again later
                span.set_attribute("neoq.job.snooze_seconds", outcome.delay)
            elif isinstance(outcome.exc, Discard):  # the handler's decision, not an error
                span.set_attribute("neoq.job.discarded", True)
            else:
                if outcome.exc is not None:
                    span.record_exception(outcome.exc)
                span.set_status(self._error, outcome.error)
        span.end()

    def job_abandoned(self, job: Job, state: Any) -> None:
        span, token = state
        self._context.detach(token)
        span.set_attribute("neoq.job.outcome", "cancelled")
        span.set_status(self._error, "cancelled at shutdown: the job stays queued")
        span.end()
