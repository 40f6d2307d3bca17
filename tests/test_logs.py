"""What the backends log, on both: lifecycle at INFO, failures with their
traceback and the job's ``job_id`` and ``queue`` as ``extra`` fields, and
nothing per job above DEBUG on success."""

from __future__ import annotations

import logging

import anyio
import pytest

from neoq_anyio import Handler, Job, open_backend
from neoq_anyio.testing import drain

from .test_processing import FAST

LOGGER = "neoq_test_logs"


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


async def test_lifecycle_and_job_records(
    connection_string: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    logger = logging.getLogger(LOGGER)

    async def handle(job: Job) -> None:
        assert job.payload is not None
        if job.payload["fail"]:
            raise ValueError("cannot do it")

    with anyio.fail_after(15):
        async with open_backend(connection_string, logger=logger, **FAST) as nq:
            await nq.start(Handler("logged", handle, concurrency=3))
            ok = await nq.enqueue(Job("logged", {"fail": False}))
            failed = await nq.enqueue(Job("logged", {"fail": True}))
            await drain(nq)
    records = _records(caplog)
    messages = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert "queue logged started with concurrency 3 (job_timeout 30 s)" in messages
    # The success: one DEBUG record, with the job's fields.
    [success] = [r for r in records if getattr(r, "job_id", None) == ok]
    assert success.levelno == logging.DEBUG
    assert success.__dict__["queue"] == "logged"
    # The failure: ERROR, with the traceback and the job's fields.
    [failure] = [r for r in records if getattr(r, "job_id", None) == failed]
    assert failure.levelno == logging.ERROR
    assert failure.__dict__["queue"] == "logged"
    assert failure.exc_info is not None
    assert isinstance(failure.exc_info[1], ValueError)
    assert "retry in" in failure.getMessage()


async def test_shutdown_says_how_many_jobs_it_cancelled(
    connection_string: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    started = anyio.Event()

    async def stuck(job: Job) -> None:
        started.set()
        await anyio.sleep_forever()

    options = {**FAST, "shutdown_timeout": 0.2}
    with anyio.fail_after(15):
        async with open_backend(
            connection_string, logger=logging.getLogger(LOGGER), **options
        ) as nq:
            await nq.start(Handler("stuck", stuck))
            await nq.enqueue(Job("stuck"))
            await started.wait()
    messages = [r.getMessage() for r in _records(caplog) if r.levelno == logging.INFO]
    assert "shutdown: taking no more jobs; 1 jobs in flight have 0.2 s to finish" in messages
    assert (
        "shutdown: cancelled 1 jobs still running after shutdown_timeout (0.2 s); "
        "they stay queued" in messages
    )


async def test_nothing_above_debug_for_successful_jobs(
    connection_string: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def handle(job: Job) -> None:
        pass

    with anyio.fail_after(15):
        async with open_backend(connection_string, logger=logging.getLogger(LOGGER), **FAST) as nq:
            await nq.start(Handler("quiet", handle))
            for n in range(5):
                await nq.enqueue(Job("quiet", {"n": n}))
            await drain(nq)
    per_job = [r for r in _records(caplog) if hasattr(r, "job_id")]
    assert len(per_job) == 5
    assert {r.levelno for r in per_job} == {logging.DEBUG}
