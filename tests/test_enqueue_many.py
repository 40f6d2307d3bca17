"""``enqueue_many``: many jobs in one round trip, ids in input order, duplicates
skipped, all or nothing on bad input; on both backends unless the test is
about PostgreSQL alone (transactions, the stored columns).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from neoq_anyio import (
    Handler,
    InvalidJobError,
    Job,
    NeoqError,
    NoQueueError,
    NoTransactionError,
    open_backend,
)
from neoq_anyio._postgres._enqueue_many import DEFAULT_MAX_RETRIES
from neoq_anyio.testing import drain, enqueued, fast_forward

from .conftest import Database
from .test_backends import opened
from .test_processing import FAST


def _in(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


class Seen:
    """A handler that records the jobs it ran, and says when it saw ``count``."""

    def __init__(self, count: int) -> None:
        self.jobs: list[Job] = []
        self.count = count
        self.all_seen = anyio.Event()

    async def __call__(self, job: Job) -> None:
        self.jobs.append(job)
        if len(self.jobs) >= self.count:
            self.all_seen.set()


async def test_ids_come_back_in_input_order(connection_string: str) -> None:
    jobs = [Job("q", {"n": n}) for n in range(5)] + [Job("other", None, max_retries=2)]
    with anyio.fail_after(15):
        async with opened(connection_string) as nq:
            ids = await nq.enqueue_many(jobs)
            stored = {job.id: job for job in await enqueued(nq)}
    assert all(isinstance(job_id, str) for job_id in ids)
    assert len(set(ids)) == len(ids)
    # Ids grow in input order, so jobs due together run in that order.
    assert [int(i or 0) for i in ids] == sorted(int(i or 0) for i in ids)
    for job, job_id in zip(jobs, ids, strict=True):
        got = stored[job_id]
        assert (got.queue, got.payload, got.status) == (job.queue, job.payload, "new")
    assert stored[ids[-1]].max_retries == 2


async def test_an_iterable_works_and_empty_is_empty(connection_string: str) -> None:
    with anyio.fail_after(15):
        async with opened(connection_string) as nq:
            assert await nq.enqueue_many([]) == []
            assert await nq.enqueue_many(()) == []
            ids = await nq.enqueue_many(Job("gen", {"n": n}) for n in range(3))
            assert len(await enqueued(nq, "gen")) == 3
    assert None not in ids


async def test_duplicates_of_stored_jobs_are_skipped(connection_string: str) -> None:
    with anyio.fail_after(15):
        async with opened(connection_string) as nq:
            first = await nq.enqueue(Job("dup", {"n": 1}))
            ids = await nq.enqueue_many(
                [Job("dup", {"n": 0}), Job("dup", {"n": 1}), Job("dup", {"n": 2})]
            )
            stored = await enqueued(nq, "dup")
    assert ids[1] is None
    assert None not in (ids[0], ids[2])
    assert sorted(job.id or "" for job in stored) == sorted([first, ids[0] or "", ids[2] or ""])


async def test_duplicates_within_the_batch_keep_the_first(connection_string: str) -> None:
    jobs = [
        Job("twins", {"n": 1}),
        Job("twins", {"n": 2}),
        Job("twins", {"n": 1}),  # the first job again
        Job("twins", {"a": 1}, fingerprint="mine"),
        Job("twins", {"b": 2}, fingerprint="mine"),  # another payload, same fingerprint
        Job("elsewhere", {"n": 1}),  # same payload on another queue: not a duplicate
    ]
    with anyio.fail_after(15):
        async with opened(connection_string) as nq:
            ids = await nq.enqueue_many(jobs)
            stored = {job.id: job for job in await enqueued(nq)}
    assert [job_id is None for job_id in ids] == [False, False, True, False, True, False]
    assert len(stored) == 4
    kept = stored[ids[3]]
    assert (kept.fingerprint, kept.payload) == ("mine", {"a": 1})


async def test_one_bad_job_stores_nothing(connection_string: str) -> None:
    good = [Job("ok", {"n": n}) for n in range(4)]
    bad_jobs: list[tuple[Any, type[Exception], str]] = [
        (Job("", {"n": 9}), NoQueueError, r"jobs\[2\]: the job has no queue"),
        (Job("ok", {"text": "a\x00b"}), InvalidJobError, r"jobs\[2\]: .*payload\['text'\]"),
        (Job("ok", {"s": {1, 2}}), InvalidJobError, r"jobs\[2\]: the payload is not JSON"),
        (Job("ok", run_after=datetime(2030, 1, 1)), InvalidJobError, r"jobs\[2\]: run_after"),
        (Job("ok", max_retries=-1), InvalidJobError, r"jobs\[2\]: max_retries"),
        ({"queue": "ok"}, InvalidJobError, r"jobs\[2\] is not a Job"),
    ]
    with anyio.fail_after(15):
        async with opened(connection_string) as nq:
            for bad, error, message in bad_jobs:
                with pytest.raises(error, match=message):
                    await nq.enqueue_many([*good[:2], bad, *good[2:]])
            with pytest.raises(InvalidJobError, match="use enqueue for one job"):
                await nq.enqueue_many(good[0])  # type: ignore[arg-type]
            assert await enqueued(nq) == []


async def test_due_jobs_wake_workers(connection_string: str) -> None:
    seen = Seen(20)
    # No polling to fall back on: only the jobs' announcements wake the workers.
    quiet = {"pending_job_check_interval": 60, "job_check_interval": 60}
    with anyio.fail_after(15):
        async with opened(connection_string, **quiet) as nq:
            await nq.start(Handler("wake", seen, concurrency=4))
            ids = await nq.enqueue_many([Job("wake", {"n": n}) for n in range(20)])
            await seen.all_seen.wait()
            await drain(nq)
            stored = await enqueued(nq, "wake")
    assert sorted(job.id or "" for job in seen.jobs) == sorted(job_id or "" for job_id in ids)
    assert {job.status for job in stored} == {"processed"}


async def test_future_jobs_run_at_their_time(connection_string: str) -> None:
    seen = Seen(2)
    quiet = {"pending_job_check_interval": 60}
    with anyio.fail_after(15):
        async with opened(connection_string, **quiet) as nq:
            await nq.start(Handler("soon", seen))
            await nq.start(Handler("later", seen))
            run_after = _in(0.5)
            await nq.enqueue_many(
                [
                    Job("soon", {"n": 1}, run_after=run_after),
                    Job("later", {"n": 2}, run_after=_in(7200)),
                    Job("soon", {"n": 0}),
                ]
            )
            await seen.all_seen.wait()
            ran = datetime.now(UTC)
            # The job two hours ahead has not run; it does once the time comes.
            assert [job.payload for job in seen.jobs] == [{"n": 0}, {"n": 1}]
            assert ran >= run_after
            seen.count, seen.all_seen = 3, anyio.Event()
            await fast_forward(nq, 7201)
            await seen.all_seen.wait()
    assert seen.jobs[-1].payload == {"n": 2}


async def test_max_retries_none_is_the_column_default(connection_string: str) -> None:
    with anyio.fail_after(15):
        async with opened(connection_string) as nq:
            ids = await nq.enqueue_many(
                [Job("r", {"n": 0}), Job("r", {"n": 1}, max_retries=0), Job("r", {"n": 2})]
            )
            stored = {job.id: job.max_retries for job in await enqueued(nq, "r")}
    assert [stored[job_id] for job_id in ids] == [23, 0, 23]


async def test_a_thousand_jobs_in_one_batch(connection_string: str) -> None:
    seen = Seen(1000)
    with anyio.fail_after(30):
        async with opened(connection_string) as nq:
            ids = await nq.enqueue_many([Job("big", {"n": n}) for n in range(1000)])
            assert len(set(ids)) == 1000
            assert None not in ids
            stored = {job.id: job.payload for job in await enqueued(nq, "big")}
            assert [stored[job_id] for job_id in ids] == [{"n": n} for n in range(1000)]
            await nq.start(Handler("big", seen, concurrency=20))
            await seen.all_seen.wait()
    assert sorted(job.payload["n"] for job in seen.jobs if job.payload) == list(range(1000))


async def test_enqueue_many_after_shutdown_raises(connection_string: str) -> None:
    async with opened(connection_string) as nq:
        await nq.shutdown()
        with pytest.raises(NeoqError, match="shut down"):
            await nq.enqueue_many([Job("late")])


async def test_memory_has_no_connection_to_enqueue_on() -> None:
    async with open_backend("memory://") as nq:
        with pytest.raises(NoTransactionError):
            await nq.enqueue_many([Job("q")], connection=object())  # type: ignore[arg-type]
        assert await enqueued(nq) == []


# -- observers -------------------------------------------------------------------------


async def test_metrics_count_each_stored_job(connection_string: str) -> None:
    registry = CollectorRegistry()
    with anyio.fail_after(15):
        async with open_backend(connection_string, metrics=registry, **FAST) as nq:
            await nq.enqueue_many([Job("m", {"n": 1}), Job("m", {"n": 2}), Job("m", {"n": 1})])
            with pytest.raises(NoQueueError):
                await nq.enqueue_many([Job("m", {"n": 3}), Job("")])
    assert registry.get_sample_value("neoq_jobs_enqueued_total", {"queue": "m"}) == 2


async def test_each_job_continues_the_enqueuers_trace(connection_string: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    seen = Seen(3)
    with anyio.fail_after(15):
        async with open_backend(connection_string, tracing=provider, **FAST) as nq:
            await nq.start(Handler("traced", seen))
            with tracer.start_as_current_span("request") as request:
                ids = await nq.enqueue_many([Job("traced", {"n": n}) for n in range(3)])
            await seen.all_seen.wait()
            await drain(nq)
    spans = exporter.get_finished_spans()
    sends = {_message_id(s): s for s in spans if s.name == "send traced"}
    runs = {_message_id(s): s for s in spans if s.name == "process traced"}
    assert sorted(sends) == sorted(runs) == sorted(job_id or "" for job_id in ids)
    for job_id in ids:
        send, run = sends[job_id or ""], runs[job_id or ""]
        # Each send is the request's child (siblings, not nested in one another),
        # and each run the child of its own job's send.
        assert send.parent is not None
        assert send.parent.span_id == request.get_span_context().span_id
        assert run.parent is not None
        assert run.parent.span_id == send.context.span_id


def _message_id(span: ReadableSpan) -> str:
    assert span.attributes is not None
    return str(span.attributes["messaging.message.id"])


# -- PostgreSQL: transactions and the stored rows ----------------------------------------


async def test_connection_commits_with_the_callers_transaction(dsn: str, db: Database) -> None:
    seen = Seen(2)
    with anyio.fail_after(15):
        async with opened(dsn, pending_job_check_interval=60) as nq:
            await nq.start(Handler("tx", seen))
            async with nq.connection() as conn:
                ids = await nq.enqueue_many(
                    [Job("tx", {"n": 1}), Job("tx", {"n": 2})], connection=conn
                )
                assert await db.value("SELECT count(*) FROM neoq_jobs") == 0  # not committed yet
            await seen.all_seen.wait()
    assert sorted(job.id or "" for job in seen.jobs) == sorted(job_id or "" for job_id in ids)


async def test_connection_rolls_back_with_the_callers_transaction(dsn: str, db: Database) -> None:
    with anyio.fail_after(15):
        async with opened(dsn) as nq:
            with pytest.raises(RuntimeError, match="changed my mind"):
                async with nq.connection() as conn:
                    await nq.enqueue_many(
                        [Job("tx", {"n": 1}), Job("tx", {"n": 2})], connection=conn
                    )
                    raise RuntimeError("changed my mind")
            assert await db.value("SELECT count(*) FROM neoq_jobs") == 0
            # A duplicate does not abort the caller's transaction either.
            async with nq.connection() as conn:
                await nq.enqueue(Job("tx", {"n": 1}), connection=conn)
                ids = await nq.enqueue_many(
                    [Job("tx", {"n": 1}), Job("tx", {"n": 3})], connection=conn
                )
                await conn.execute("SELECT 1")
            assert ids[0] is None
            assert await db.value("SELECT count(*) FROM neoq_jobs") == 2


async def test_jobs_enqueued_east_of_utc_are_announced(dsn: str) -> None:
    # Go neoq's trigger misses due jobs when the session's TimeZone is ahead of
    # UTC; with no polling, only neoq_anyio's own announcements wake the worker.
    seen = Seen(2)
    with anyio.fail_after(15):
        async with opened(dsn, pending_job_check_interval=60) as nq:
            await nq.start(Handler("tokyo", seen))
            async with nq.connection() as conn:
                await conn.execute("SET TimeZone = 'Asia/Tokyo'")
                await nq.enqueue_many(
                    [Job("tokyo", {"n": 1}), Job("tokyo", {"n": 2})], connection=conn
                )
            await seen.all_seen.wait()


async def test_a_plain_psycopg_connection_on_asyncio(
    dsn: str, db: Database, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    if anyio_backend[0] != "asyncio":
        pytest.skip("psycopg's own AsyncConnection waits through asyncio only")
    import psycopg

    async with opened(dsn) as nq:
        conn = await psycopg.AsyncConnection.connect(dsn)
        async with conn:
            await nq.enqueue_many([Job("plain", {"n": 1}), Job("plain", {"n": 2})], connection=conn)
            assert await db.value("SELECT count(*) FROM neoq_jobs") == 0  # not committed yet
        assert await db.value("SELECT count(*) FROM neoq_jobs") == 2


async def test_stored_columns_match_the_one_job_insert(dsn: str, db: Database) -> None:
    deadline = _in(3600)
    run_after = _in(600)
    with anyio.fail_after(15):
        async with opened(dsn, tracing=TracerProvider()) as nq:
            [job_id] = await nq.enqueue_many(
                [Job("cols", {"k": "v"}, run_after=run_after, deadline=deadline, max_retries=4)]
            )
            one = await nq.enqueue(
                Job("cols", {"k": "w"}, run_after=run_after, deadline=deadline, max_retries=4)
            )
    query = (
        "SELECT fingerprint, status::text, retries, max_retries, run_after, deadline, "
        "trace_context IS NOT NULL FROM neoq_jobs WHERE id = %s"
    )
    many_row = (await db.fetch(query, (int(job_id or 0),)))[0]
    one_row = (await db.fetch(query, (int(one),)))[0]
    assert many_row[1:] == one_row[1:] == ("new", 0, 4, run_after, deadline, True)
    assert len(many_row[0]) == 32  # Go neoq's md5 fingerprint
    default = await db.value(
        "SELECT column_default FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'neoq_jobs' "
        "AND column_name = 'max_retries'"
    )
    assert default == str(DEFAULT_MAX_RETRIES)
