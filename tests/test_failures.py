"""Failures, retries with Go neoq's backoff, dead jobs, timeouts, deadlines, callbacks."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime, timedelta

import anyio
import anyio.lowlevel
import psycopg
import pytest

from neoq_anyio import (
    ConfigurationError,
    Handler,
    Job,
    JobTimeoutError,
    current_transaction,
    open_backend,
)
from neoq_anyio._outcome import as_run, backoff_seconds, decide, refuse_to_run
from neoq_anyio.testing import dead_jobs, enqueued

from .conftest import Database, wait_until
from .test_processing import FAST, Recorder, backend


@pytest.mark.parametrize(
    ("retries", "jitter", "expected"),
    [(0, 0, 16), (0, 29, 16), (1, 0, 17), (1, 29, 46), (2, 10, 52), (5, 3, 656)],
)
def test_backoff_is_go_neoqs(retries: int, jitter: int, expected: int) -> None:
    # r**4 + 15 + rand(0..29) * r + 1
    assert backoff_seconds(retries, jitter=jitter) == expected


def test_backoff_random_term_stays_in_range() -> None:
    values = {backoff_seconds(1) for _ in range(500)}
    assert min(values) >= 17
    assert max(values) <= 46
    assert len(values) > 10


@pytest.mark.parametrize(
    ("retries", "max_retries", "dead"),
    [(0, 0, True), (0, 1, False), (1, 1, True), (22, 23, False), (23, 23, True), (50, None, False)],
)
def test_decide_failure(retries: int, max_retries: int | None, dead: bool) -> None:
    job = Job("q", max_retries=max_retries)._evolve(retries=retries)
    outcome = decide(job, KeyError("missing"))
    assert outcome.kind == ("dead" if dead else "retry")
    assert outcome.retries == retries
    assert outcome.error == "KeyError: 'missing'"
    assert (outcome.delay > 0) is not dead


def test_decide_success_keeps_the_runs_retry_count() -> None:
    job = as_run(Job("q")._evolve(status="failed", retries=2))
    assert job.retries == 3  # a run of a failed job is a retry
    outcome = decide(job, None)
    assert (outcome.kind, outcome.retries, outcome.error) == ("processed", 3, None)
    assert as_run(Job("q")).retries == 0


def test_a_job_past_its_deadline_is_refused_unrun() -> None:
    now = datetime.now(UTC)
    late = Job("q", deadline=now - timedelta(seconds=1))._evolve(retries=1)
    outcome = refuse_to_run(late, now)
    assert outcome is not None
    assert (outcome.kind, outcome.retries, outcome.ran) == ("dead", 1, False)
    assert outcome.error is not None
    assert outcome.error.startswith("JobDeadlineError")
    assert refuse_to_run(Job("q", deadline=now + timedelta(seconds=1)), now) is None
    assert refuse_to_run(Job("q"), now) is None


async def make_due(db: Database, job_id: str) -> None:
    """Bring a failed job's retry forward so the test need not wait out the backoff."""
    await db.execute(
        "UPDATE neoq_jobs SET run_after = clock_timestamp() + interval '50 milliseconds' "
        "WHERE id = %s",
        (int(job_id),),
    )


async def test_failed_job_is_retried_with_backoff(dsn: str, db: Database) -> None:
    runs: list[Job] = []
    first = anyio.Event()
    second = anyio.Event()

    async def handle(job: Job) -> None:
        runs.append(job)
        if len(runs) == 1:
            first.set()
            raise RuntimeError("transient")
        second.set()

    async with backend(dsn) as nq:
        await nq.start(Handler("retry", handle))
        before = datetime.now(UTC)
        job_id = await nq.enqueue(Job("retry", {"n": 1}))
        with anyio.fail_after(10):
            await first.wait()
        status = await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {job_id}", lambda s: s == "failed"
        )
        assert status == "failed"
        retries, run_after, error = (
            await db.fetch(f"SELECT retries, run_after, error FROM neoq_jobs WHERE id = {job_id}")
        )[0]
        assert retries == 0
        assert error == "RuntimeError: transient"
        # backoff(0) = 16 s, whatever the random term.
        assert before + timedelta(seconds=15) < run_after < before + timedelta(seconds=20)
        await make_due(db, job_id)
        with anyio.fail_after(10):
            await second.wait()
        await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {job_id}", lambda s: s == "processed"
        )
        assert await db.value(f"SELECT retries FROM neoq_jobs WHERE id = {job_id}") == 1
    assert [j.retries for j in runs] == [0, 1]
    assert [j.status for j in runs] == ["new", "failed"]


async def test_failed_job_never_runs_before_its_run_after(dsn: str, db: Database) -> None:
    failed = anyio.Event()
    runs = 0

    async def handle(job: Job) -> None:
        nonlocal runs
        runs += 1
        failed.set()
        raise RuntimeError("always")

    async with backend(dsn, pending_job_check_interval=0.05) as nq:
        await nq.start(Handler("patient", handle))
        job_id = await nq.enqueue(Job("patient"))
        with anyio.fail_after(10):
            await failed.wait()
        await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {job_id}", lambda s: s == "failed"
        )
        # The poller and the scheduler run many times meanwhile; none may
        # run the job before its backoff expires.
        await anyio.sleep(0.5)
    assert runs == 1


async def test_max_retries_zero_means_no_retry(dsn: str, db: Database) -> None:
    rec = Recorder()

    async def handle(job: Job) -> None:
        await rec(job)
        raise ValueError("fatal")

    async with backend(dsn) as nq:
        await nq.start(Handler("fragile", handle))
        job_id = await nq.enqueue(Job("fragile", {"x": 1}, max_retries=0))
        await rec.wait()
        await db.wait_for(
            f"SELECT count(*) FROM neoq_dead_jobs WHERE id = {job_id}", lambda n: n == 1
        )
    assert await db.value(f"SELECT count(*) FROM neoq_jobs WHERE id = {job_id}") == 0
    row = (
        await db.fetch(
            "SELECT queue, payload, retries, max_retries, error, status FROM neoq_dead_jobs"
        )
    )[0]
    assert row == ("fragile", {"x": 1}, 0, 0, "ValueError: fatal", "failed")


async def test_job_dies_after_max_retries(dsn: str, db: Database) -> None:
    runs: list[int] = []
    ran = anyio.Event()

    async def handle(job: Job) -> None:
        nonlocal ran
        runs.append(job.retries)
        ran.set()
        raise ValueError(f"attempt {job.retries}")

    async with backend(dsn) as nq:
        await nq.start(Handler("twice", handle))
        job_id = await nq.enqueue(Job("twice", max_retries=1))
        for attempt in range(2):
            with anyio.fail_after(10):
                await ran.wait()
            ran = anyio.Event()
            if attempt == 0:
                await db.wait_for(
                    f"SELECT status FROM neoq_jobs WHERE id = {job_id}", lambda s: s == "failed"
                )
                await make_due(db, job_id)
        await db.wait_for(
            f"SELECT count(*) FROM neoq_dead_jobs WHERE id = {job_id}", lambda n: n == 1
        )
    assert runs == [0, 1]
    assert await db.fetch("SELECT retries, error FROM neoq_dead_jobs") == [
        (1, "ValueError: attempt 1")
    ]


async def test_unset_max_retries_is_the_column_default(dsn: str, db: Database) -> None:
    async with backend(dsn) as nq:
        job_id = await nq.enqueue(Job("defaults"))
    assert await db.value(f"SELECT max_retries FROM neoq_jobs WHERE id = {job_id}") == 23


async def test_succeeding_job_is_never_dead(dsn: str, db: Database) -> None:
    rec = Recorder()
    async with backend(dsn) as nq:
        await nq.start(Handler("fine", rec))
        job_id = await nq.enqueue(Job("fine", max_retries=0))
        await rec.wait()
        await db.wait_for(
            f"SELECT status FROM neoq_jobs WHERE id = {job_id}", lambda s: s == "processed"
        )
    assert await db.value("SELECT count(*) FROM neoq_dead_jobs") == 0


async def test_job_timeout_cancels_the_handler(dsn: str, db: Database) -> None:
    started = anyio.Event()
    cancelled = anyio.Event()
    failures: list[BaseException] = []

    async def handle(job: Job) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise

    async def recover(job: Job, exc: BaseException) -> None:
        failures.append(exc)

    async with backend(dsn) as nq:
        await nq.start(Handler("slow", handle, job_timeout=0.2, recover_callback=recover))
        job_id = await nq.enqueue(Job("slow"))
        with anyio.fail_after(10):
            await started.wait()
            await cancelled.wait()
        error = await db.wait_for(
            f"SELECT error FROM neoq_jobs WHERE id = {job_id}", lambda e: e is not None
        )
        await anyio.lowlevel.checkpoint()
    assert error.startswith("JobTimeoutError")
    assert len(failures) == 1
    assert isinstance(failures[0], JobTimeoutError)


async def test_job_timeout_above_transaction_timeout_is_refused(dsn: str) -> None:
    async with backend(dsn, transaction_timeout=5) as nq:
        with pytest.raises(ConfigurationError, match="transaction_timeout"):
            await nq.start(Handler("long", Recorder(), job_timeout=6))
        with pytest.raises(ConfigurationError, match="transaction_timeout"):
            await nq.start(Handler("unbounded", Recorder(), job_timeout=None))
        await nq.start(Handler("equal", Recorder(), job_timeout=timedelta(seconds=5)))
    async with backend(dsn, transaction_timeout=0) as nq:
        await nq.start(Handler("unbounded", Recorder(), job_timeout=None))


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"concurrency": 0}, id="zero-concurrency"),
        pytest.param({"job_timeout": -1}, id="negative-timeout"),
        pytest.param({"job_timeout": 0}, id="zero-timeout"),
    ],
)
def test_bad_handler_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Handler("q", Recorder(), **kwargs)  # type: ignore[arg-type]


def test_sync_handler_is_refused() -> None:
    def handle(job: Job) -> None:
        pass

    with pytest.raises(ConfigurationError, match="async"):
        Handler("q", handle)  # type: ignore[arg-type]


async def test_past_deadline_job_is_not_run(dsn: str, db: Database) -> None:
    ran: list[Job] = []
    on_time = Recorder()

    async def handle(job: Job) -> None:
        ran.append(job)
        await on_time(job)

    async with backend(dsn) as nq:
        late_id = await nq.enqueue(
            Job("deadlines", {"late": True}, deadline=datetime.now(UTC) - timedelta(seconds=1))
        )
        await nq.enqueue(
            Job("deadlines", {"late": False}, deadline=datetime.now(UTC) + timedelta(hours=1))
        )
        await nq.start(Handler("deadlines", handle))
        await on_time.wait()
        error = await db.wait_for(
            f"SELECT error FROM neoq_dead_jobs WHERE id = {late_id}", lambda e: e is not None
        )
    assert error.startswith("JobDeadlineError")
    assert [j.payload for j in ran] == [{"late": False}]


async def test_handler_callback_replaces_backend_callback(dsn: str) -> None:
    backend_calls: list[str] = []
    handler_calls: list[str] = []
    both = Recorder(expected=2)

    def backend_cb(job: Job, exc: BaseException) -> None:
        backend_calls.append(str(exc))
        both.done.set() if len(backend_calls) + len(handler_calls) >= 2 else None

    async def handler_cb(job: Job, exc: BaseException) -> None:
        handler_calls.append(str(exc))
        both.done.set() if len(backend_calls) + len(handler_calls) >= 2 else None

    async def boom(job: Job) -> None:
        raise KeyError(job.queue)

    async with backend(dsn, recovery_callback=backend_cb) as nq:
        await nq.start(Handler("own", boom, recover_callback=handler_cb))
        await nq.start(Handler("default", boom))
        await nq.enqueue(Job("own"))
        await nq.enqueue(Job("default"))
        await both.wait()
    assert handler_calls == ["'own'"]
    assert backend_calls == ["'default'"]


async def test_error_in_recover_callback_is_logged(
    dsn: str, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    called = anyio.Event()

    def bad_callback(job: Job, exc: BaseException) -> None:
        called.set()
        raise RuntimeError("callback broke")

    async def boom(job: Job) -> None:
        raise ValueError("handler broke")

    with caplog.at_level(logging.ERROR, logger="neoq_anyio"):
        async with backend(dsn) as nq:
            await nq.start(Handler("cb", boom, recover_callback=bad_callback))
            job_id = await nq.enqueue(Job("cb"))
            with anyio.fail_after(10):
                await called.wait()
            # The failure is recorded regardless, and the worker goes on.
            await db.wait_for(
                f"SELECT status FROM neoq_jobs WHERE id = {job_id}", lambda s: s == "failed"
            )
            await wait_until(
                lambda: any("recover callback failed" in r.getMessage() for r in caplog.records)
            )
    record = next(r for r in caplog.records if "recover callback failed" in r.getMessage())
    assert record.exc_info is not None
    assert "callback broke" in str(record.exc_info[1])


async def test_job_timeout_during_a_query_cancels_it_on_the_server(dsn: str, db: Database) -> None:
    runs: list[str] = []
    second = Recorder()

    async def slow_query(job: Job) -> None:
        runs.append(job.id or "")
        if (job.payload or {}).get("slow"):
            await current_transaction().execute("SELECT pg_sleep(30)")
        else:
            await second(job)

    async with backend(dsn + " pool_max_conns=2") as nq:
        await nq.start(Handler("sql", slow_query, job_timeout=0.3, concurrency=1))
        slow_id = await nq.enqueue(Job("sql", {"slow": True}))
        error = await db.wait_for(
            f"SELECT error FROM neoq_jobs WHERE id = {slow_id}", lambda e: e is not None
        )
        assert error.startswith("JobTimeoutError")
        # The query stopped on the server, and the worker's connection is fine:
        # the next job runs on it.
        sleeping = await db.value(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
            "AND state = 'active'"
        )
        assert sleeping == 0
        await nq.enqueue(Job("sql", {"slow": False}))
        await second.wait()


@pytest.mark.parametrize("kind", ["postgres", "memory"])
async def test_handler_that_swallows_its_timeout_still_times_out(
    kind: str, request: pytest.FixtureRequest
) -> None:
    swallowed = anyio.Event()
    failures: list[BaseException] = []

    async def stubborn(job: Job) -> None:
        try:
            await anyio.sleep_forever()
        except BaseException:  # the cancellation of its timeout, swallowed
            swallowed.set()
        # and returns, as if it had succeeded

    async def recover(job: Job, exc: BaseException) -> None:
        failures.append(exc)

    dsn = str(request.getfixturevalue("dsn")) if kind == "postgres" else "memory://"
    async with open_backend(dsn, **FAST) as nq:
        handler = Handler("stubborn", stubborn, job_timeout=0.2, recover_callback=recover)
        await nq.start(handler)
        await nq.enqueue(Job("stubborn", max_retries=0))
        with anyio.fail_after(10):
            await swallowed.wait()
        await wait_until(lambda: bool(failures))
        [dead] = await dead_jobs(nq, "stubborn")
    assert dead.error is not None
    assert dead.error.startswith("JobTimeoutError")
    assert [type(exc) for exc in failures] == [JobTimeoutError]


@pytest.mark.parametrize("kind", ["postgres", "memory"])
async def test_failures_are_logged_with_their_traceback(
    kind: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    def look_up(payload: dict[str, object]) -> object:
        return payload["missing"]

    async def handle(job: Job) -> None:
        look_up(job.payload or {})

    dsn = str(request.getfixturevalue("dsn")) if kind == "postgres" else "memory://"
    with caplog.at_level(logging.ERROR, logger="neoq_anyio"):
        async with open_backend(dsn, **FAST) as nq:
            await nq.start(Handler("lookups", handle))
            await nq.enqueue(Job("lookups"))
            await wait_until(lambda: any("failed" in r.getMessage() for r in caplog.records))
    record = next(r for r in caplog.records if "failed" in r.getMessage())
    assert "KeyError: 'missing'" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], KeyError)
    text = logging.Formatter().format(record)
    assert "Traceback (most recent call last)" in text
    assert "in look_up" in text


async def test_failures_log_a_redacted_traceback_when_it_holds_the_password(
    server_dsn: str, schema_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    password = "hunter2-sesame"
    params = conninfo_to_dict(server_dsn)
    params.update(options=f"-csearch_path={schema_name}", password=password)
    dsn = make_conninfo("", **params)  # trust auth: the password is never checked

    async def handle(job: Job) -> None:
        raise RuntimeError(f"cannot reach {dsn}")

    with caplog.at_level(logging.ERROR, logger="neoq_anyio"):
        async with open_backend(dsn, **FAST) as nq:
            await nq.start(Handler("secrets", handle))
            await nq.enqueue(Job("secrets"))
            await wait_until(lambda: any("failed" in r.getMessage() for r in caplog.records))
            [job] = await enqueued(nq, "secrets")
    record = next(r for r in caplog.records if "failed" in r.getMessage())
    text = logging.Formatter().format(record)
    assert "Traceback (most recent call last)" in text
    assert "in handle" in text
    assert password not in text
    assert job.error is not None
    assert job.error.startswith("RuntimeError: cannot reach")
    assert password not in job.error


async def test_swallowed_database_error_is_quoted_in_the_record(dsn: str, db: Database) -> None:
    async def careless(job: Job) -> None:
        with contextlib.suppress(psycopg.Error):  # and returns, leaving it aborted
            await current_transaction().execute("SELECT 1 / 0")

    async with backend(dsn) as nq:
        await nq.start(Handler("careless", careless))
        job_id = await nq.enqueue(Job("careless"))
        error = await db.wait_for(
            f"SELECT error FROM neoq_jobs WHERE id = {int(job_id)}", lambda e: e is not None
        )
    assert error == (
        "DatabaseError: the handler left the job's transaction aborted "
        "after a database error it caught: division by zero"
    )
