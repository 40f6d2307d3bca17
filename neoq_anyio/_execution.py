"""Calling a handler and its recover callback: the part both backends share."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import anyio

from ._context import _job, _transaction
from ._exceptions import JobTimeoutError

if TYPE_CHECKING:
    import logging

    import psycopg

    from ._models import Handler, Job, RecoverCallback

__all__ = ["call_handler", "call_recover", "describe_error", "run_handler"]


def describe_error(exc: BaseException) -> str:
    """The text stored in a failed job's ``error`` column."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def run_handler(
    handler: Handler, job: Job, transaction: psycopg.AsyncConnection[Any] | None = None
) -> Exception | None:
    """Run the handler with the job (and its transaction) in context; returns
    what it raised, if anything. Cancellation propagates."""
    job_token = _job.set(job)
    tx_token = _transaction.set(transaction)
    try:
        await handler.handle(job)
    except Exception as exc:
        return exc
    finally:
        _transaction.reset(tx_token)
        _job.reset(job_token)
    return None


async def call_handler(
    handler: Handler,
    job: Job,
    timeout: float | None,
    transaction: psycopg.AsyncConnection[Any] | None = None,
) -> Exception | None:
    """``run_handler`` under the handler's timeout: past it the handler is
    cancelled and ``JobTimeoutError`` is returned."""
    with anyio.CancelScope() as scope:
        if timeout is not None:
            scope.deadline = anyio.current_time() + timeout
        exc = await run_handler(handler, job, transaction)
    if scope.cancelled_caught:
        return JobTimeoutError(f"the job ran past its job_timeout of {timeout:g} s")
    return exc


async def call_recover(
    callback: RecoverCallback, job: Job, exc: BaseException, logger: logging.Logger
) -> None:
    """Call a recover callback, sync or async; its own errors are logged, never raised."""
    try:
        result = callback(job, exc)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("recover callback failed for job %s", job.id)
