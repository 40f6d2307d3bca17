"""Lease mode on the in-memory backend: PostgreSQL's observable rules, where
they apply in one process.

While a lease-mode job runs it reads ``running`` (with the ``retries`` of the
run: attempts count at the claim); a job cancelled at shutdown is released as
it was before the claim; ``job_timeout`` is the handler's own business. A
lease cannot be lost in one process, so there is nothing about expiry here.
Handlers block on events the test sets, so every state is observed while it
holds, without sleeps.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from neoq_anyio import (
    Backend,
    ConfigurationError,
    DuplicateJobError,
    Handler,
    Job,
    JobTimeoutError,
    MemoryBackend,
    NoTransactionError,
    current_transaction,
    open_backend,
)
from neoq_anyio.testing import dead_jobs, drain, enqueued, fast_forward


class Gate:
    """A handler that runs until released: ``started`` is set as each job
    begins; ``fail`` makes it raise once released."""

    def __init__(self, *, fail: bool = False) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.fail = fail
        self.seen: list[Job] = []

    async def __call__(self, job: Job) -> None:
        self.seen.append(job)
        self.started.set()
        await self.release.wait()
        if self.fail:
            raise RuntimeError("gate says no")

    def reset(self) -> None:
        self.started, self.release = anyio.Event(), anyio.Event()


def lease(queue: str, handle: Any, **options: Any) -> Handler:
    return Handler(queue, handle, execution="lease", **options)


async def _stats(nq: Backend, queue: str) -> tuple[int, int]:
    [stats] = [s for s in await nq.queue_stats() if s.queue == queue]
    return stats.running, stats.due


async def test_a_leased_job_reads_running() -> None:
    gate = Gate()
    with anyio.fail_after(10):
        async with open_backend() as nq:
            await nq.start(lease("l", gate))
            job_id = await nq.enqueue(Job("l", {"n": 1}))
            await gate.started.wait()
            job = await nq.get_job(job_id)
            assert job is not None
            assert (job.status, job.retries, job.payload) == ("running", 0, {"n": 1})
            assert [j.id for j in await nq.list_jobs(status="running")] == [job_id]
            assert await nq.list_jobs(status="new") == []
            assert [j.status for j in await enqueued(nq, "l")] == ["running"]
            assert await _stats(nq, "l") == (1, 0)
            assert nq.statistics().jobs_in_flight == 1
            gate.release.set()
            await drain(nq)
            job = await nq.get_job(job_id)
            assert job is not None
            assert (job.status, job.retries) == ("processed", 0)
            assert await _stats(nq, "l") == (0, 0)
    # The handler sees the job as a transaction-mode handler does.
    assert (gate.seen[0].status, gate.seen[0].retries) == ("new", 0)


async def test_a_transaction_mode_job_in_flight_reads_as_stored() -> None:
    gate = Gate()
    with anyio.fail_after(10):
        async with open_backend() as nq:
            await nq.start(Handler("t", gate))
            job_id = await nq.enqueue(Job("t"))
            await gate.started.wait()
            job = await nq.get_job(job_id)
            assert job is not None
            assert job.status == "new"
            assert await _stats(nq, "t") == (0, 1)
            gate.release.set()
            await drain(nq)


async def test_a_retry_reads_its_run_retries_while_running() -> None:
    gate = Gate(fail=True)
    with anyio.fail_after(10):
        async with open_backend() as nq:
            await nq.start(lease("r", gate))
            job_id = await nq.enqueue(Job("r", max_retries=1))
            await gate.started.wait()
            gate.release.set()
            await drain(nq)
            failed = await nq.get_job(job_id)
            assert failed is not None
            assert (failed.status, failed.retries) == ("failed", 0)
            gate.reset()
            await fast_forward(nq, 100)  # backoff(0) is at most 16 + 29 + 1 s
            await gate.started.wait()
            running = await nq.get_job(job_id)
            assert running is not None
            assert (running.status, running.retries) == ("running", 1)
            gate.release.set()
            await drain(nq)
            [dead] = await dead_jobs(nq, "r")
    assert (dead.status, dead.retries) == ("dead", 1)
    assert [job.retries for job in gate.seen] == [0, 1]


async def test_shutdown_releases_a_job_as_it_was_before_the_claim() -> None:
    first = Gate(fail=True)
    with anyio.fail_after(10):
        async with open_backend(shutdown_timeout=0.1) as nq:
            await nq.start(lease("s", first))
            await nq.enqueue(Job("s", {"n": 1}))
            await first.started.wait()
            first.release.set()
            await drain(nq)
            [before] = await enqueued(nq, "s")
            assert before.status == "failed"
            first.reset()
            first.fail = False
            await fast_forward(nq, 100)
            await first.started.wait()  # running, never released
            [during] = await enqueued(nq, "s")
            assert (during.status, during.retries) == ("running", 1)
        [after] = await enqueued(nq, "s")
    assert after == before
    assert (after.status, after.retries, after.error, after.run_after) == (
        before.status,
        before.retries,
        before.error,
        before.run_after,
    )


async def test_a_released_job_is_due_again_at_once() -> None:
    stuck = Gate()
    with anyio.fail_after(10):
        async with open_backend(shutdown_timeout=0.1) as nq:
            await nq.start(lease("again", stuck))
            job_id = await nq.enqueue(Job("again"))
            await stuck.started.wait()
            # The workers stop, the job is released, the block goes on.
            await nq.shutdown()
            [job] = await enqueued(nq, "again")
            assert (job.id, job.status, job.retries, job.error) == (job_id, "new", 0, None)
            assert nq.statistics().jobs_in_flight == 0
            assert job.run_after is not None
            assert isinstance(nq, MemoryBackend)
            assert job.run_after <= nq.clock.now()
            assert nq._has_due()  # its queue's next entry is due now


async def test_no_transaction_in_lease_mode() -> None:
    outcome: list[type[Exception]] = []

    async def handle(job: Job) -> None:
        try:
            current_transaction()
        except NoTransactionError as exc:
            outcome.append(type(exc))

    with anyio.fail_after(10):
        async with open_backend() as nq:
            await nq.start(lease("tx", handle))
            await nq.enqueue(Job("tx"))
            await drain(nq)
    assert outcome == [NoTransactionError]


async def test_job_timeout_none_or_above_transaction_timeout_is_accepted() -> None:
    with anyio.fail_after(10):
        async with open_backend(transaction_timeout=30) as nq:
            await nq.start(lease("forever", Gate(), job_timeout=None))
            await nq.start(lease("long", Gate(), job_timeout=3600))
            with pytest.raises(ConfigurationError, match="transaction_timeout"):
                await nq.start(Handler("tx-forever", Gate(), job_timeout=None))
            assert set(nq.statistics().queues) == {"forever", "long"}


async def test_job_timeout_still_applies() -> None:
    failures: list[BaseException] = []

    async def stuck(job: Job) -> None:
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        async with open_backend() as nq:
            handler = lease(
                "slow", stuck, job_timeout=0.05, recover_callback=lambda j, e: failures.append(e)
            )
            await nq.start(handler)
            await nq.enqueue(Job("slow"))
            while not failures:
                await drain(nq)
            [job] = await enqueued(nq, "slow")
    assert isinstance(failures[0], JobTimeoutError)
    assert (job.status, job.retries) == ("failed", 0)
    assert (job.error or "").startswith("JobTimeoutError")


async def test_a_duplicate_of_a_leased_job_is_refused() -> None:
    # The claimed job keeps its status underneath (as on PostgreSQL), so
    # deduplication is the same as in transaction mode.
    gate = Gate()
    with anyio.fail_after(10):
        async with open_backend() as nq:
            await nq.start(lease("d", gate))
            await nq.enqueue(Job("d", {"n": 1}))
            await gate.started.wait()
            with pytest.raises(DuplicateJobError):
                await nq.enqueue(Job("d", {"n": 1}))
            assert await nq.enqueue_many([Job("d", {"n": 1})]) == [None]
            gate.release.set()
            await drain(nq)


async def test_cancel_job_cancels_a_running_lease_mode_job() -> None:
    gate = Gate()
    callbacks: list[BaseException] = []
    with anyio.fail_after(10):
        async with open_backend() as nq:
            handler = lease("c", gate, recover_callback=lambda j, e: callbacks.append(e))
            await nq.start(handler)
            job_id = await nq.enqueue(Job("c", {"n": 1}))
            await gate.started.wait()
            assert await nq.retry_job(job_id) == await nq.get_job(job_id)  # left as it is
            assert not await nq.delete_job(job_id)
            assert await nq.cancel_job(job_id)
            await drain(nq)
            [dead] = await dead_jobs(nq, "c")
            assert await enqueued(nq, "c") == []
            # A job like it may be enqueued again.
            await nq.enqueue(Job("c", {"n": 1}))
    assert (dead.id, dead.status, dead.error, dead.retries) == (job_id, "dead", "cancelled", 0)
    assert callbacks == []  # a cancel is not the handler's failure


async def test_cancel_job_leaves_a_running_transaction_mode_job() -> None:
    gate = Gate()
    with anyio.fail_after(10):
        async with open_backend() as nq:
            await nq.start(Handler("tc", gate))
            job_id = await nq.enqueue(Job("tc"))
            await gate.started.wait()
            assert not await nq.cancel_job(job_id)
            gate.release.set()
            await drain(nq)
            [job] = await enqueued(nq, "tc")
    assert job.status == "processed"


async def test_many_jobs_run_at_once_bounded_by_concurrency() -> None:
    gate = Gate()
    running = 0
    hundred = anyio.Event()

    async def handle(job: Job) -> None:
        nonlocal running
        running += 1
        if running == 100:
            hundred.set()
        await gate.release.wait()

    with anyio.fail_after(10):
        async with open_backend() as nq:
            await nq.start(lease("wide", handle, concurrency=100, job_timeout=None))
            await nq.enqueue_many([Job("wide", {"n": n}) for n in range(150)])
            await hundred.wait()
            assert await _stats(nq, "wide") == (100, 50)
            gate.release.set()
            await drain(nq)
            assert {job.status for job in await enqueued(nq, "wide")} == {"processed"}
