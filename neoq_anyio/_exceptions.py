"""The exception hierarchy: every error neoq_anyio raises derives from NeoqError."""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ConnectionStringError",
    "DatabaseError",
    "DuplicateJobError",
    "InvalidJobError",
    "JobDeadlineError",
    "JobTimeoutError",
    "NeoqError",
    "NoJobError",
    "NoQueueError",
    "NoTransactionError",
    "PoolTimeoutError",
]


class NeoqError(Exception):
    """Base class of every error raised by neoq_anyio."""


class ConnectionStringError(NeoqError, ValueError):
    """The connection string is empty, malformed, has an unknown scheme or a bad pool option.

    The message names the culprit and never contains the password.
    """


class ConfigurationError(NeoqError, ValueError):
    """An option or a handler is invalid (for example a ``job_timeout`` above
    ``transaction_timeout``, a negative duration, or a second handler for a queue)."""


class InvalidJobError(NeoqError, ValueError):
    """A job cannot be enqueued as given: its queue name is blank or over 63
    bytes, its payload is not a JSON object or holds a string with NUL, its
    fingerprint is not a string, a timestamp is naive, or ``max_retries`` is
    out of range. Nothing was inserted."""


class NoQueueError(InvalidJobError):
    """A job was enqueued without a queue name (Go neoq's ``ErrNoQueueSpecified``)."""


class DuplicateJobError(NeoqError):
    """An unprocessed job with the same queue, fingerprint and status already exists
    (Go neoq's ``ErrDuplicateJob``). Nothing was inserted."""


class NoJobError(NeoqError, LookupError):
    """``current_job()`` was called outside a running job."""


class NoTransactionError(NeoqError, LookupError):
    """``current_transaction()`` was called outside a job's transaction
    (Go neoq's ``ErrNoTransactionInContext``)."""


class PoolTimeoutError(NeoqError, TimeoutError):
    """No pooled connection became free within ``connection_timeout``
    (Go neoq's ``ErrExceededConnectionPoolTimeout``)."""


class JobDeadlineError(NeoqError):
    """A job's ``deadline`` passed before it could run; it was not run
    (Go neoq's ``ErrJobExceededDeadline``)."""


class JobTimeoutError(NeoqError, TimeoutError):
    """A handler ran past its ``job_timeout`` and was cancelled."""


class LeaseLostError(NeoqError):
    """A lease-mode job's lease was lost (it expired, and another worker may
    have claimed the job): nothing this run writes is recorded. Raised by the
    first use of ``current_transaction()`` after the loss; the handler itself
    is cancelled."""


class JobLostError(NeoqError):
    """What a lease-mode job's record says when the worker running it was lost
    (killed, hung or cut off) and its lease expired: the attempt counts as a
    failed run."""


class DatabaseError(NeoqError):
    """PostgreSQL or the connection to it failed.

    The message never contains the password. The psycopg error is the
    ``__cause__``, except for failures to connect, whose libpq messages may
    echo connection details: those are summarised in the message instead.

    Attributes:
        sqlstate: PostgreSQL's five-character error code (``"42P04"``), or
            ``None`` when the failure did not come from the server.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
