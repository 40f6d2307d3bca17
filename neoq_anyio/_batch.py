"""Checking and encoding a batch of jobs (``enqueue_many``), for both backends.

A batch is all or nothing: every job is checked and its payload encoded
before either backend stores anything. Errors are the ones ``enqueue``
raises for the same job, their message prefixed with the job's place in the
batch (``jobs[3]: ...``), which a batch of a thousand needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._exceptions import InvalidJobError, NeoqError
from ._fingerprint import encode_payload
from ._models import Job, validate_job

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["check_batch", "encode_batch"]


def check_batch(jobs: Iterable[Job]) -> list[Job]:
    """``jobs`` as a list, each one checked as ``enqueue`` checks a job.

    Raises:
        InvalidJobError: ``jobs`` is not an iterable of ``Job`` (a lone
            ``Job`` included: that is ``enqueue``'s).
        NoQueueError, InvalidJobError: as ``validate_job``, for the first
            bad job, named by its index.
    """
    if isinstance(jobs, Job) or not _iterable(jobs):
        raise InvalidJobError(
            f"enqueue_many takes an iterable of jobs, got {type(jobs).__name__}"
            + (": use enqueue for one job" if isinstance(jobs, Job) else "")
        )
    batch = list(jobs)
    for index, job in enumerate(batch):
        if not isinstance(job, Job):
            raise InvalidJobError(f"jobs[{index}] is not a Job: {type(job).__name__}")
        try:
            validate_job(job)
        except NeoqError as exc:
            raise _at(index, exc) from None
    return batch


def encode_batch(jobs: Sequence[Job]) -> list[tuple[str | None, str]]:
    """Each job's payload as JSON text and its fingerprint (its own, else Go
    neoq's), as ``encode_payload`` gives them for ``enqueue``.

    Raises:
        InvalidJobError: a payload cannot be stored (see ``encode_payload``);
            the message names the job's index.
    """
    encoded: list[tuple[str | None, str]] = []
    for index, job in enumerate(jobs):
        try:
            text, fingerprint = encode_payload(job.queue, job.payload)
        except NeoqError as exc:
            raise _at(index, exc) from None
        encoded.append((text, job.fingerprint or fingerprint))
    return encoded


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return not isinstance(value, str | bytes | dict)


def _at(index: int, exc: NeoqError) -> NeoqError:
    """``exc`` again, its message saying which job of the batch it is about."""
    return type(exc)(f"jobs[{index}]: {exc}")
