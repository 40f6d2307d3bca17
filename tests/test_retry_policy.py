"""Retry policy: a handler's ``backoff``, ``Snooze`` and ``Discard``.

The rules are pure (``neoq_anyio._outcome.decide``) and tested as such first;
then each is run on both backends, in both execution modes, on both loops:
what the job's row holds afterwards, whether the run's writes rolled back,
what the recover callback, the log and the metrics saw.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

import neoq_anyio
from neoq_anyio import (
    ConfigurationError,
    Discard,
    Handler,
    Job,
    MemoryBackend,
    NeoqError,
    Snooze,
    current_transaction,
    open_backend,
)
from neoq_anyio._outcome import after_failed_record, as_run, decide, handler_backoff
from neoq_anyio.testing import dead_jobs, drain, fast_forward

from .conftest import wait_until
from .test_processing import FAST

if TYPE_CHECKING:
    from collections.abc import Callable

    from neoq_anyio import Backend
    from neoq_anyio._models import Execution

LOGGER = "neoq_test_retry_policy"
HOUR = 3600.0

# -- the pure rules ------------------------------------------------------------------


def _failed(retries: int, max_retries: int | None = 23) -> Job:
    """A failed job with ``retries``, as its next run sees it (``as_run``)."""
    return as_run(Job("q", max_retries=max_retries)._evolve(status="failed", retries=retries))


def test_a_snooze_keeps_the_retries_the_job_had_before_the_run() -> None:
    job = _failed(2)
    assert job.retries == 3  # the run counts as a retry...
    outcome = decide(job, Snooze(90))
    # ...but a snoozed one does not: stored as before it.
    assert (outcome.kind, outcome.retries, outcome.delay, outcome.error) == ("snooze", 2, 90, None)
    new = decide(as_run(Job("q")), Snooze(timedelta(minutes=2)))
    assert (new.kind, new.retries, new.delay) == ("snooze", 0, 120)


def test_a_snooze_never_kills_a_job_out_of_retries() -> None:
    outcome = decide(_failed(5, max_retries=5), Snooze(1))
    assert (outcome.kind, outcome.retries) == ("snooze", 5)


def test_a_discard_is_dead_with_its_reason_even_with_retries_left() -> None:
    discard = Discard("the account is closed")
    outcome = decide(_failed(0), discard)
    assert (outcome.kind, outcome.retries) == ("dead", 1)
    assert outcome.error == "Discard: the account is closed"
    assert outcome.exc is discard


def test_a_snooze_or_discard_wrapped_alone_in_groups_still_steers() -> None:
    snooze = Snooze(5)
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [snooze])])
    assert decide(as_run(Job("q")), nested).kind == "snooze"
    assert decide(as_run(Job("q")), ExceptionGroup("g", [Discard("no")])).kind == "dead"
    # With anything else beside it, the run failed.
    mixed = ExceptionGroup("g", [Snooze(5), ValueError("boom")])
    assert decide(as_run(Job("q")), mixed).kind == "retry"


def test_a_handlers_backoff_replaces_go_neoqs() -> None:
    seen: list[int] = []

    def backoff(retries: int) -> float:
        seen.append(retries)
        return 2.5 * (retries + 1)

    outcome = decide(_failed(3), RuntimeError("x"), backoff)
    assert (outcome.kind, outcome.retries, outcome.delay) == ("retry", 4, 12.5)
    assert outcome.backoff_error is None
    assert seen == [4]  # the failed run's retries, as Go neoq's formula takes them
    first = decide(as_run(Job("q")), RuntimeError("x"), lambda r: timedelta(minutes=r + 1))
    assert (first.retries, first.delay) == (0, 60)
    # A dead job asks no backoff.
    assert decide(_failed(0, max_retries=0), RuntimeError("x"), backoff).kind == "dead"
    assert seen == [4]


def _raises(retries: int) -> float:
    raise ZeroDivisionError("oops")


@pytest.mark.parametrize(
    "backoff",
    [
        _raises,
        lambda r: "soon",
        lambda r: -1,
        lambda r: float("nan"),
        lambda r: float("inf"),
        lambda r: True,
        lambda r: None,
        lambda r: 10**400,
        lambda r: 200 * 365 * 86400,
    ],
    ids=["raises", "str", "negative", "nan", "inf", "bool", "none", "huge-int", "200-years"],
)
def test_a_broken_backoff_falls_back_to_go_neoqs(backoff: Any) -> None:
    delay, broken = handler_backoff(backoff, 0)
    assert delay == 16  # 0**4 + 15 + rand * 0 + 1
    assert broken is not None
    outcome = decide(as_run(Job("q")), RuntimeError("x"), backoff)
    assert (outcome.kind, outcome.delay) == ("retry", 16)
    assert outcome.backoff_error is not None


def test_zero_backoff_retries_at_once() -> None:
    assert handler_backoff(lambda r: 0, 7) == (0.0, None)


def test_a_success_that_cannot_be_recorded_takes_the_handlers_backoff() -> None:
    job = as_run(Job("q"))
    failed = after_failed_record(job, decide(job, None), RuntimeError("lost"), lambda r: 7)
    assert (failed.kind, failed.delay) == ("retry", 7)
    snoozed = decide(job, Snooze(3))
    assert after_failed_record(job, snoozed, RuntimeError("lost"), lambda r: 7) is snoozed


def test_backoff_must_be_a_plain_callable() -> None:
    async def handle(job: Job) -> None: ...

    async def async_backoff(retries: int) -> float:
        return 1.0

    with pytest.raises(ConfigurationError, match="backoff"):
        Handler("q", handle, backoff=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not async"):
        Handler("q", handle, backoff=async_backoff)  # type: ignore[arg-type]
    assert Handler("q", handle, backoff=lambda r: 1).backoff is not None


def test_snooze_takes_a_duration() -> None:
    assert Snooze(1.5).seconds == 1.5
    assert Snooze(timedelta(hours=1)).seconds == HOUR
    assert Snooze(0).seconds == 0
    assert str(Snooze(2)) == "snoozed for 2 s"
    for bad in (-1, "1s", float("nan"), True, 200 * 365 * 86400):
        with pytest.raises(ConfigurationError):
            Snooze(bad)  # type: ignore[arg-type]


def test_snooze_and_discard_are_public_signals_not_errors() -> None:
    for name in ("Snooze", "Discard"):
        assert name in neoq_anyio.__all__
        signal = getattr(neoq_anyio, name)
        assert signal.__module__ == "neoq_anyio"
        assert signal.__doc__
        # A handler's own `except NeoqError:` must not swallow them.
        assert issubclass(signal, Exception)
        assert not issubclass(signal, NeoqError)
    assert Discard("why").reason == "why"


# -- on the backends -----------------------------------------------------------------

EXECUTIONS = pytest.mark.parametrize("execution", ["transaction", "lease"])


async def _job(nq: Backend, job_id: str) -> Job:
    job = await nq.get_job(job_id)
    assert job is not None
    return job


async def _wait_stored(
    nq: Backend, job_id: str, until: Callable[[Job], bool] | None = None, **fields: Any
) -> Job:
    """Wait (bounded) until the stored job's fields read ``fields`` (and
    ``until(job)`` holds)."""
    found: list[Job] = []

    async def stored() -> bool:
        job = await nq.get_job(job_id)
        if job is None or any(getattr(job, k) != v for k, v in fields.items()):
            return False
        if until is not None and not until(job):
            return False
        found.append(job)
        return True

    await wait_until(stored)
    return found[-1]


def _about(nq: Backend, when: datetime | None, seconds: float, *, slack: float = 5.0) -> bool:
    """Whether ``when`` is ``seconds`` from the backend's now, give or take
    ``slack`` (in memory, ``fast_forward`` moves the backend's clock)."""
    assert when is not None
    now = nq.clock.now() if isinstance(nq, MemoryBackend) else datetime.now(UTC)
    return abs((when - now).total_seconds() - seconds) < slack


async def _side_table(nq: Backend, backend_kind: str) -> None:
    """A table the handlers write to through their transaction (PostgreSQL)."""
    if backend_kind == "postgres":
        async with nq.connection() as conn:
            await conn.execute("CREATE TABLE side (job bigint, n int)")


async def _side_rows(nq: Backend, backend_kind: str) -> list[tuple[Any, ...]]:
    if backend_kind != "postgres":
        return []
    async with nq.connection() as conn:
        cur = await conn.execute("SELECT job, n FROM side ORDER BY n")
        return await cur.fetchall()


async def _write(backend_kind: str, job: Job, n: int) -> None:
    if backend_kind == "postgres":
        await current_transaction().execute(
            "INSERT INTO side (job, n) VALUES (%s, %s)", (int(job.id or 0), n)
        )


@EXECUTIONS
async def test_a_handlers_backoff_sets_the_retrys_run_after(
    connection_string: str, execution: Execution
) -> None:
    asked: list[int] = []
    runs: list[Job] = []

    def backoff(retries: int) -> timedelta:
        asked.append(retries)
        return timedelta(hours=retries + 1)

    async def handle(job: Job) -> None:
        runs.append(job)
        if len(runs) < 3:
            raise RuntimeError(f"failure {len(runs)}")

    with anyio.fail_after(20):
        async with open_backend(connection_string, **FAST) as nq:
            await nq.start(Handler("backoff", handle, execution=execution, backoff=backoff))
            job_id = await nq.enqueue(Job("backoff"))
            failed = await _wait_stored(
                nq, job_id, status="failed", error="RuntimeError: failure 1"
            )
            assert failed.retries == 0
            assert _about(nq, failed.run_after, HOUR)
            await fast_forward(nq, HOUR)
            again = await _wait_stored(nq, job_id, error="RuntimeError: failure 2")
            assert again.retries == 1
            assert _about(nq, again.run_after, 2 * HOUR)
            await fast_forward(nq, 2 * HOUR)
            await _wait_stored(nq, job_id, status="processed")
    assert asked == [0, 1]
    assert [job.retries for job in runs] == [0, 1, 2]


def _backoff_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "backoff failed" in r.getMessage()]


@EXECUTIONS
async def test_a_broken_backoff_falls_back_and_says_so(
    connection_string: str, execution: Execution, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def backoff(retries: int) -> float:
        raise ZeroDivisionError("no backoff today")

    async def handle(job: Job) -> None:
        raise RuntimeError("fails")

    with anyio.fail_after(20):
        async with open_backend(connection_string, logger=logging.getLogger(LOGGER), **FAST) as nq:
            await nq.start(Handler("broken", handle, execution=execution, backoff=backoff))
            job_id = await nq.enqueue(Job("broken"))
            failed = await _wait_stored(nq, job_id, status="failed")
            assert failed.error == "RuntimeError: fails"
            assert _about(nq, failed.run_after, 16, slack=2)  # Go neoq's backoff for retries 0
            await wait_until(lambda: _backoff_warnings(caplog) != [])
    [warning] = _backoff_warnings(caplog)
    assert warning.levelno == logging.WARNING
    assert warning.__dict__["job_id"] == job_id
    assert warning.exc_info is not None
    assert isinstance(warning.exc_info[1], ZeroDivisionError)
    assert "Go neoq's backoff (16 s) used instead" in warning.getMessage()


@EXECUTIONS
async def test_a_snooze_keeps_retries_status_and_error_and_rolls_back(
    connection_string: str, backend_kind: str, execution: Execution
) -> None:
    runs: list[Job] = []
    recovered: list[BaseException] = []

    async def handle(job: Job) -> None:
        runs.append(job)
        await _write(backend_kind, job, len(runs))
        if len(runs) == 1:
            raise RuntimeError("boom")  # a failure: retried at once (backoff 0)
        if len(runs) == 2:
            raise Snooze(HOUR)

    with anyio.fail_after(20):
        async with open_backend(connection_string, **FAST) as nq:
            await _side_table(nq, backend_kind)
            await nq.start(
                Handler(
                    "snoozy",
                    handle,
                    execution=execution,
                    backoff=lambda r: 0,
                    recover_callback=lambda job, exc: recovered.append(exc),
                )
            )
            job_id = await nq.enqueue(Job("snoozy"))
            await wait_until(lambda: len(runs) == 2)
            snoozed = await _wait_stored(
                nq, job_id, lambda job: _about(nq, job.run_after, HOUR), status="failed"
            )
            assert snoozed.retries == 0
            assert snoozed.error == "RuntimeError: boom"  # the failure's, untouched
            assert await _side_rows(nq, backend_kind) == []  # both runs rolled back
            await fast_forward(nq, HOUR)
            done = await _wait_stored(nq, job_id, status="processed")
            assert await _side_rows(nq, backend_kind) == (
                [(int(job_id), 3)] if backend_kind == "postgres" else []
            )
    # The third run is the first retry again: the snoozed one did not count.
    assert [(job.status, job.retries) for job in runs] == [("new", 0), ("failed", 1), ("failed", 1)]
    assert done.retries == 1
    assert [type(exc) for exc in recovered] == [RuntimeError]  # not called for the snooze


@EXECUTIONS
async def test_a_snoozed_job_runs_again_after_its_delay(
    connection_string: str, execution: Execution
) -> None:
    runs: list[tuple[float, Job]] = []
    done = anyio.Event()

    async def handle(job: Job) -> None:
        runs.append((anyio.current_time(), job))
        if len(runs) < 3:
            raise Snooze(0.3)
        done.set()

    with anyio.fail_after(20):
        async with open_backend(connection_string, **FAST) as nq:
            await nq.start(Handler("later", handle, execution=execution))
            job_id = await nq.enqueue(Job("later", max_retries=0))
            await done.wait()
            job = await _wait_stored(nq, job_id, status="processed")
    assert [(run.status, run.retries) for _, run in runs] == [("new", 0)] * 3
    assert runs[1][0] - runs[0][0] >= 0.25
    assert runs[2][0] - runs[1][0] >= 0.25
    # max_retries=0: a single failure would have killed it; snoozes did not.
    assert (job.retries, job.error) == (0, None)


@EXECUTIONS
async def test_a_discard_kills_the_job_at_once_with_its_reason(
    connection_string: str,
    backend_kind: str,
    execution: Execution,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    runs: list[Job] = []
    recovered: list[BaseException] = []

    async def handle(job: Job) -> None:
        runs.append(job)
        await _write(backend_kind, job, 1)
        raise Discard("the account is closed")

    with anyio.fail_after(20):
        async with open_backend(connection_string, logger=logging.getLogger(LOGGER), **FAST) as nq:
            await _side_table(nq, backend_kind)
            await nq.start(
                Handler(
                    "doomed",
                    handle,
                    execution=execution,
                    recover_callback=lambda job, exc: recovered.append(exc),
                )
            )
            job_id = await nq.enqueue(Job("doomed", max_retries=5))
            dead = await _wait_stored(nq, job_id, status="dead")
            await drain(nq)
            assert await _side_rows(nq, backend_kind) == []
            [listed] = await dead_jobs(nq, "doomed")
    assert (dead.error, dead.retries) == ("Discard: the account is closed", 0)
    assert listed.id == job_id
    assert len(runs) == 1
    assert recovered == []
    [record] = [r for r in caplog.records if r.__dict__.get("job_id") == job_id]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert record.getMessage() == (
        f"job {job_id} on queue doomed discarded by its handler (moved to dead jobs): "
        "the account is closed"
    )


@EXECUTIONS
async def test_a_discarded_retry_keeps_its_count(
    connection_string: str, execution: Execution
) -> None:
    async def handle(job: Job) -> None:
        if job.retries == 0:
            raise RuntimeError("first")
        raise Discard("gave up")

    with anyio.fail_after(20):
        async with open_backend(connection_string, **FAST) as nq:
            await nq.start(Handler("twice", handle, execution=execution, backoff=lambda r: 0))
            job_id = await nq.enqueue(Job("twice"))
            dead = await _wait_stored(nq, job_id, status="dead")
    assert (dead.retries, dead.error) == (1, "Discard: gave up")


@EXECUTIONS
async def test_snoozes_are_counted_apart_and_logged_at_debug(
    connection_string: str, execution: Execution, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    registry = CollectorRegistry()

    snoozed: list[Job] = []

    async def handle(job: Job) -> None:
        assert job.payload is not None
        if job.payload["discard"]:
            raise Discard("no")
        if job.payload["snooze"] and not snoozed:
            snoozed.append(job)
            raise Snooze(0)

    with anyio.fail_after(20):
        async with open_backend(
            connection_string, logger=logging.getLogger(LOGGER), metrics=registry, **FAST
        ) as nq:
            await nq.start(Handler("counted", handle, execution=execution))
            snoozer = await nq.enqueue(Job("counted", {"snooze": True, "discard": False}))
            await nq.enqueue(Job("counted", {"snooze": False, "discard": True}))

            def value(name: str) -> float | None:
                return registry.get_sample_value(name, {"queue": "counted"})

            # Reported once recorded: wait for the reports, not the rows.
            await wait_until(
                lambda: (
                    value("neoq_jobs_processed_total") == 1 and value("neoq_jobs_dead_total") == 1
                )
            )
            assert value("neoq_jobs_snoozed_total") == 1
            assert value("neoq_jobs_failed_total") == 0  # a discard is no failed run
            assert value("neoq_jobs_in_flight") == 0
            assert (await _job(nq, snoozer)).status == "processed"
    [line] = [r for r in caplog.records if "snoozed" in r.getMessage()]
    assert line.levelno == logging.DEBUG
    assert line.getMessage() == f"job {snoozer} on queue counted snoozed (due again in 0 s)"


async def test_a_snooze_gives_back_the_lease(dsn: str) -> None:
    """Lease mode on PostgreSQL: the snoozed job is no longer leased, and reads
    as it was (not ``running``)."""
    snoozed = anyio.Event()

    async def handle(job: Job) -> None:
        snoozed.set()
        raise Snooze(HOUR)

    with anyio.fail_after(20):
        async with open_backend(dsn, **FAST) as nq:
            await nq.start(Handler("leased", handle, execution="lease"))
            job_id = await nq.enqueue(Job("leased"))
            await snoozed.wait()
            job = await _wait_stored(nq, job_id, status="new")
            assert _about(nq, job.run_after, HOUR)
            async with nq.connection() as conn:
                cur = await conn.execute(
                    "SELECT lease_token, lease_expires_at, retries FROM neoq_jobs WHERE id = %s",
                    (int(job_id),),
                )
                assert await cur.fetchall() == [(None, None, 0)]


async def test_a_snooze_after_a_lost_lease_keeps_the_lost_attempt(dsn: str) -> None:
    """A lease taken over from a dead worker counts that worker's attempt as a
    failed run; snoozing the next run does not undo that count."""
    runs: list[Job] = []

    async def handle(job: Job) -> None:
        runs.append(job)
        if len(runs) == 1:
            raise Snooze(0)

    with anyio.fail_after(20):
        async with open_backend(dsn, **FAST) as nq:
            job_id = await nq.enqueue(Job("orphan"))
            async with nq.connection() as conn:  # claimed by a worker that died
                await conn.execute(
                    "UPDATE neoq_jobs SET lease_token = 7, "
                    "lease_expires_at = now() - interval '1 s' WHERE id = %s",
                    (int(job_id),),
                )
            await nq.start(Handler("orphan", handle, execution="lease", lease_duration=1))
            await _wait_stored(nq, job_id, status="processed")
    assert [job.retries for job in runs] == [1, 1]


@EXECUTIONS
async def test_a_snooze_is_recorded_even_when_its_transaction_died(
    dsn: str, execution: Execution
) -> None:
    """The job's session ends mid-run: the snooze is recorded in a new
    transaction (or, in lease mode, under the lease alone), still no failure."""
    runs: list[Job] = []

    async def handle(job: Job) -> None:
        runs.append(job)
        # The session is gone (an error here, caught); the snooze still stands.
        with contextlib.suppress(Exception):
            await current_transaction().execute("SELECT pg_terminate_backend(pg_backend_pid())")
        raise Snooze(HOUR)

    with anyio.fail_after(20):
        async with open_backend(dsn, **FAST) as nq:
            await nq.start(Handler("orphaned", handle, execution=execution))
            job_id = await nq.enqueue(Job("orphaned"))
            job = await _wait_stored(nq, job_id, lambda job: _about(nq, job.run_after, HOUR))
    assert (job.status, job.retries, job.error) == ("new", 0, None)
    assert len(runs) == 1


async def test_a_snooze_or_discard_is_no_error_in_the_jobs_span(connection_string: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def handle(job: Job) -> None:
        assert job.payload is not None
        if job.payload["n"] == 1:
            raise Snooze(HOUR)
        raise Discard("unwanted")

    with anyio.fail_after(20):
        async with open_backend(connection_string, tracing=provider, **FAST) as nq:
            await nq.start(Handler("spans", handle))
            snoozed = await nq.enqueue(Job("spans", {"n": 1}))
            discarded = await nq.enqueue(Job("spans", {"n": 2}))
            await _wait_stored(nq, discarded, status="dead")
            await wait_until(lambda: len(_process_spans(exporter)) == 2)
    spans = {span.attributes["messaging.message.id"]: span for span in _process_spans(exporter)}
    assert spans[snoozed].attributes["neoq.job.outcome"] == "snooze"
    assert spans[snoozed].attributes["neoq.job.snooze_seconds"] == HOUR
    assert spans[discarded].attributes["neoq.job.outcome"] == "dead"
    assert spans[discarded].attributes["neoq.job.discarded"] is True
    for span in spans.values():
        assert span.status.status_code is StatusCode.UNSET
        assert not span.events  # no exception recorded


def _process_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == "process spans"]
