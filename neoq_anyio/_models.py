"""Jobs and handlers: the values users build and receive."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import reprlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from ._durations import to_seconds
from ._exceptions import ConfigurationError, InvalidJobError, NoQueueError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from ._exceptions import NeoqError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_JOB_TIMEOUT",
    "DEFAULT_LEASE_DURATION",
    "MAX_QUEUE_NAME_BYTES",
    "Handler",
    "Job",
    "JobStatus",
    "QueueStats",
    "check_queue_name",
    "validate_job",
]

JobStatus: TypeAlias = Literal["new", "running", "failed", "processed", "dead"]
Execution: TypeAlias = Literal["transaction", "lease"]

DEFAULT_CONCURRENCY = 50
"""Jobs a handler runs at once in one process when not told otherwise (Go neoq's value)."""

DEFAULT_JOB_TIMEOUT = 30.0
"""Seconds a handler may run before it is cancelled (Go neoq's value)."""

DEFAULT_LEASE_DURATION = 30.0
"""Seconds a lease-mode claim lasts without a heartbeat."""

MAX_QUEUE_NAME_BYTES = 63
"""The longest queue name, in UTF-8 bytes: PostgreSQL's limit on channel names
(NAMEDATALEN - 1). Longer names would be truncated by LISTEN but refused by
``pg_notify``, so a job on such a queue could never be announced."""

_MAX_INT4 = 2**31 - 1  # PostgreSQL's integer, the type of max_retries
_MIN_INT2, _MAX_INT2 = -(2**15), 2**15 - 1  # PostgreSQL's smallint, the type of priority
_REPR = reprlib.Repr()
_REPR.maxstring = 40


@dataclass(frozen=True, slots=True)
class Job:
    """A unit of work on a queue.

    Build one to enqueue it; handlers receive one read back from the
    database, with the read-only fields filled in.

    Args:
        queue: the queue's name; its handler runs the job. Required.
        payload: a JSON object (a ``dict`` with string keys), or ``None``.
        fingerprint: deduplication key; defaults to Go neoq's md5 of the
            queue and the payload's JSON. While an unprocessed job with the
            same queue, fingerprint and status exists, enqueueing another
            raises ``DuplicateJobError``.
        run_after: timezone-aware time before which the job does not run;
            default: now.
        deadline: timezone-aware time after which the job is not run any
            more (it fails with ``JobDeadlineError``).
        max_retries: how many times a failed job is retried before it moves
            to ``neoq_dead_jobs``; ``0`` means never retried, ``None`` the
            database default (23).
        priority: among a queue's due jobs, higher priority runs first, then
            older ``run_after`` (a smallint: -32768 to 32767; default 0).

    Read-only fields (set by the backend): ``id`` (str), ``status``
    (``"new"``, ``"running"``, ``"failed"``, ``"processed"`` or ``"dead"``),
    ``retries``, ``ran_at``, ``error``, ``created_at`` (for a dead job: when
    it died).
    """

    queue: str
    payload: dict[str, Any] | None = None
    fingerprint: str | None = field(default=None, kw_only=True)
    run_after: datetime | None = field(default=None, kw_only=True)
    deadline: datetime | None = field(default=None, kw_only=True)
    max_retries: int | None = field(default=None, kw_only=True)
    priority: int = field(default=0, kw_only=True)
    id: str | None = field(default=None, init=False)
    status: JobStatus = field(default="new", init=False)
    retries: int = field(default=0, init=False)
    ran_at: datetime | None = field(default=None, init=False)
    error: str | None = field(default=None, init=False)
    created_at: datetime | None = field(default=None, init=False)
    # The enqueuer's trace context (W3C traceparent, ...), carried to the
    # job's run when tracing is on (neoq_anyio._tracing); stored, never shown.
    _trace_context: dict[str, str] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def _evolve(self, **changes: Any) -> Job:
        """A copy with some fields changed, read-only ones included.

        The one way backends set the read-only fields: a ``Job`` users hold
        never changes, backends store and hand out new ones.
        """
        unknown = changes.keys() - _JOB_FIELD_SET
        if unknown:
            raise TypeError(f"Job has no field {unknown.pop()!r}")
        job = object.__new__(Job)
        set_ = object.__setattr__
        for name in _JOB_FIELDS:
            set_(job, name, changes[name] if name in changes else getattr(self, name))
        return job

    @classmethod
    def _from_columns(cls, row: Sequence[Any]) -> Job:
        """Rebuild a job as stored from a row holding ``STORED_COLUMNS`` first,
        in that order (``trace_context`` may be missing); later columns are
        ignored. By position, not by name: claims build thousands a second."""
        job = object.__new__(cls)
        set_ = object.__setattr__
        set_(job, "id", str(row[0]))
        set_(job, "fingerprint", row[1])
        set_(job, "queue", row[2])
        set_(job, "status", row[3])
        set_(job, "deadline", _utc(row[4]))
        set_(job, "payload", row[5])
        set_(job, "retries", row[6] or 0)
        set_(job, "max_retries", row[7])
        set_(job, "run_after", _utc(row[8]))
        set_(job, "ran_at", _utc(row[9]))
        set_(job, "created_at", _utc(row[10]))
        set_(job, "error", row[11] or None)  # Go neoq stores "" for no error
        set_(job, "priority", row[12] or 0)
        set_(job, "_trace_context", row[13] if len(row) > 13 else None)
        return job


STORED_COLUMNS: Final = (
    "id",
    "fingerprint",
    "queue",
    "status",
    "deadline",
    "payload",
    "retries",
    "max_retries",
    "run_after",
    "ran_at",
    "created_at",
    "error",
    "priority",
    "trace_context",
)
"""The columns ``Job._from_columns`` reads, in its order."""

_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
_JOB_FIELD_SET = frozenset(_JOB_FIELDS)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue's jobs by state, from ``queue_stats()``.

    Attributes:
        queue: the queue's name.
        due: jobs that may run now (new or failed, ``run_after`` passed),
            those being run in transaction mode included.
        scheduled: new jobs whose ``run_after`` is still ahead.
        running: jobs leased by a worker now (lease mode).
        failed: failed jobs waiting for their retry's ``run_after``.
        processed: processed jobs kept (see retention).
        dead: jobs in the dead jobs.
        oldest_due_seconds: how long the oldest due job has been due, from its
            ``run_after``; ``None`` when nothing is due.
        paused: whether the queue is paused.
    """

    queue: str
    due: int
    scheduled: int
    running: int
    failed: int
    processed: int
    dead: int
    oldest_due_seconds: float | None
    paused: bool


def job_document(job: Job) -> dict[str, Any]:
    """A job as JSON shows it (the command line's ``--json``, the dashboard's API)."""
    return {
        "id": job.id,
        "queue": job.queue,
        "status": job.status,
        "payload": job.payload,
        "retries": job.retries,
        "max_retries": job.max_retries,
        "priority": job.priority,
        "run_after": _iso(job.run_after),
        "ran_at": _iso(job.ran_at),
        "created_at": _iso(job.created_at),
        "error": job.error,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None


def check_queue_name(queue: object, error: type[NeoqError]) -> None:
    """Refuse a queue name PostgreSQL cannot use: the rule both backends apply.

    A queue name is a ``str`` of 1 to ``MAX_QUEUE_NAME_BYTES`` (63) bytes in
    UTF-8, not blank (whitespace only), without NUL. Jobs, handlers and cron
    queues all go through this check, so both backends refuse the same names.

    Args:
        queue: the name to check.
        error: the exception to raise (``InvalidJobError`` for a job,
            ``ConfigurationError`` for a handler).

    Raises:
        NeoqError: ``error``, with a message saying what is wrong.
    """
    if not isinstance(queue, str):
        raise error(f"a queue name must be a str, got {type(queue).__name__}")
    if not queue:
        raise error("the queue name is empty")
    try:
        size = len(queue.encode())
    except UnicodeEncodeError:
        size = -1
    if size <= MAX_QUEUE_NAME_BYTES and not queue.isspace() and "\x00" not in queue and size > 0:
        return  # the usual case, kept cheap: enqueue checks every job
    shown = _REPR.repr(queue)
    if queue.isspace():
        raise error(f"the queue name {shown} is blank")
    if "\x00" in queue:
        raise error(f"the queue name {shown} contains NUL, which PostgreSQL cannot store")
    if size < 0:
        raise error(f"the queue name {shown} is not valid Unicode (a lone surrogate)")
    raise error(
        f"the queue name {shown} is {size} bytes in UTF-8; PostgreSQL allows at most "
        f"{MAX_QUEUE_NAME_BYTES} (its limit on channel names)"
    )


def validate_job(job: Job) -> None:
    """Check a job before it is enqueued, on either backend.

    What only shows once the payload is encoded (values JSON cannot hold,
    NUL or lone surrogates in its strings) is refused by
    ``_fingerprint.encode_payload``, which both backends call next.

    Raises:
        NoQueueError: the queue is empty.
        InvalidJobError: a blank, too long or otherwise unusable queue name
            (see ``check_queue_name``), a naive timestamp, a ``max_retries``
            that is negative or beyond PostgreSQL's integer, a payload that
            is not a dict (JSON object) or None, or a fingerprint that is not
            a str PostgreSQL can store.
    """
    if job.queue is None or job.queue == "":
        raise NoQueueError("the job has no queue: give Job a queue name")
    check_queue_name(job.queue, InvalidJobError)
    if job.payload is not None and not isinstance(job.payload, dict):
        raise InvalidJobError(
            f"the payload must be a JSON object (a dict) or None, got {type(job.payload).__name__}"
        )
    fingerprint = job.fingerprint
    if fingerprint is not None:
        if not isinstance(fingerprint, str):
            raise InvalidJobError(f"fingerprint must be a str or None, got {fingerprint!r}")
        if "\x00" in fingerprint:
            raise InvalidJobError("fingerprint contains NUL, which PostgreSQL cannot store")
        try:
            fingerprint.encode()
        except UnicodeEncodeError:
            raise InvalidJobError("fingerprint is not valid Unicode (a lone surrogate)") from None
    for name in ("run_after", "deadline"):
        value = getattr(job, name)
        if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
            raise InvalidJobError(f"{name} must be a timezone-aware datetime, got {value!r}")
    priority = job.priority
    if priority != 0 and (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not _MIN_INT2 <= priority <= _MAX_INT2
    ):
        raise InvalidJobError(
            f"priority must be an int from {_MIN_INT2} to {_MAX_INT2}, got {priority!r}"
        )
    retries = job.max_retries
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)):
        raise InvalidJobError(f"max_retries must be an int or None, got {retries!r}")
    if retries is not None and not 0 <= retries <= _MAX_INT4:
        raise InvalidJobError(f"max_retries must be between 0 and {_MAX_INT4}, got {retries}")


HandleFunc: TypeAlias = "Callable[[Job], Awaitable[Any]]"
RecoverCallback: TypeAlias = "Callable[[Job, BaseException], Any]"
Backoff: TypeAlias = "Callable[[int], float | timedelta]"


@dataclass(frozen=True, slots=True)
class Handler:
    """Runs the jobs of one queue.

    Args:
        queue: the queue to process: 1 to 63 bytes in UTF-8, not blank.
            ``""`` with ``start_cron`` derives the queue name from the
            schedule.
        handle: ``async def handle(job: Job) -> None``. Returning marks the
            job processed; raising marks it failed (and retried with backoff),
            except ``Snooze`` (due again later) and ``Discard`` (dead at once).
        concurrency: at most this many jobs of the queue run at once in this
            process (default 50, as Go neoq). Each job in flight holds a
            pooled connection.
        job_timeout: seconds (or ``timedelta``) after which a running job is
            cancelled and fails with ``JobTimeoutError`` (default 30 s);
            ``None`` for no limit. It may not exceed the backend's
            ``transaction_timeout``.
        max_queue_capacity: accepted for Go neoq parity; the PostgreSQL
            backend ignores it (the table is the queue).
        recover_callback: ``callback(job, exc)``, sync or async, called for
            every exception the handler raises (but ``Snooze`` and
            ``Discard``); replaces the backend's ``recovery_callback``.
        execution: ``"transaction"`` (default, Go neoq's model: each running
            job holds a pooled connection and its open transaction) or
            ``"lease"`` (jobs are claimed in batches under a lease and run
            holding no connection; see the docs' "Execution modes").
        lease_duration: lease mode: seconds (or ``timedelta``) a claim lasts
            without a heartbeat (default 30 s). Heartbeats extend it while
            the handler runs; a worker that dies loses its jobs' leases
            within this time, and they run again.
        global_concurrency: lease mode: at most this many jobs of the queue
            run at once across every process (``None``: no such bound).
        rate_limit: lease mode: ``(starts, seconds)``: at most ``starts``
            jobs of the queue start in each window of ``seconds`` (windows
            aligned on the database's clock), across every process.
        backoff: ``backoff(retries) -> seconds`` (or a ``timedelta``): the
            delay before a failed job runs again, replacing Go neoq's
            ``retries**4 + 15 + rand(0..29) * retries + 1``. ``retries`` is
            the failed run's count, as Go neoq's formula takes it: 0 after a
            job's first failure, 1 after its second... A plain function, run
            in the event loop: keep it quick. One that raises or returns no
            duration is logged, and Go neoq's backoff used for that retry.

    Raises:
        ConfigurationError: a blank or too long queue name, a non-positive
            concurrency, a negative timeout, a ``handle`` that is not an
            async callable, or a ``backoff`` that is not a plain callable.
    """

    queue: str
    handle: HandleFunc
    concurrency: int = DEFAULT_CONCURRENCY
    job_timeout: float | timedelta | None = DEFAULT_JOB_TIMEOUT
    max_queue_capacity: int | None = None
    recover_callback: RecoverCallback | None = None
    execution: Execution = "transaction"
    lease_duration: float | timedelta = DEFAULT_LEASE_DURATION
    backoff: Backoff | None = None
    global_concurrency: int | None = None
    rate_limit: tuple[int, float | timedelta] | None = None

    def __post_init__(self) -> None:
        if self.queue != "":  # "" is start_cron's "derive it"; start() refuses it
            check_queue_name(self.queue, ConfigurationError)
        if not callable(self.handle):
            raise ConfigurationError(f"handle must be an async callable, got {self.handle!r}")
        if not _is_async_callable(self.handle):
            raise ConfigurationError(
                f"handle must be an async function (async def), got {self.handle!r}"
            )
        c = self.concurrency
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigurationError(f"concurrency must be a positive int, got {c!r}")
        _ = self.timeout_seconds  # validates job_timeout
        cap = self.max_queue_capacity
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigurationError(f"max_queue_capacity must be a positive int, got {cap!r}")
        if self.recover_callback is not None and not callable(self.recover_callback):
            raise ConfigurationError("recover_callback must be callable")
        if self.execution not in ("transaction", "lease"):
            raise ConfigurationError(
                f"execution must be 'transaction' or 'lease', got {self.execution!r}"
            )
        _ = self.lease_seconds  # validates lease_duration
        if self.backoff is not None and (
            not callable(self.backoff) or _is_async_callable(self.backoff)
        ):
            raise ConfigurationError(
                "backoff must be a plain function from the retry count to seconds "
                f"(not async), got {self.backoff!r}"
            )

        self._check_limits()

    def _check_limits(self) -> None:
        limit = self.global_concurrency
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ConfigurationError(f"global_concurrency must be a positive int, got {limit!r}")
        if self.rate_limit is not None:
            _ = self.rate_window  # validates rate_limit
        if (limit is not None or self.rate_limit is not None) and self.execution != "lease":
            raise ConfigurationError(
                "global_concurrency and rate_limit need lease mode: Handler(..., execution='lease')"
            )

    @property
    def rate_window(self) -> tuple[int, float] | None:
        """``rate_limit`` as (starts, seconds); ``None`` without a rate limit.

        Raises:
            ConfigurationError: ``rate_limit`` is not a pair of a positive int
                and a positive duration.
        """
        if self.rate_limit is None:
            return None
        try:
            starts, per = self.rate_limit
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"rate_limit must be a pair (starts, seconds), got {self.rate_limit!r}"
            ) from None
        if isinstance(starts, bool) or not isinstance(starts, int) or starts < 1:
            raise ConfigurationError(f"rate_limit's starts must be a positive int, got {starts!r}")
        return starts, to_seconds(per, name="rate_limit's window", allow_zero=False)

    @property
    def lease_seconds(self) -> float:
        """``lease_duration`` in seconds.

        Raises:
            ConfigurationError: ``lease_duration`` is not a positive duration.
        """
        return to_seconds(self.lease_duration, name="lease_duration", allow_zero=False)

    @property
    def timeout_seconds(self) -> float | None:
        """``job_timeout`` in seconds (``None``: no limit).

        Raises:
            ConfigurationError: ``job_timeout`` is not a positive duration.
        """
        if self.job_timeout is None:
            return None
        return to_seconds(self.job_timeout, name="job_timeout", allow_zero=False)


def _is_async_callable(obj: Any) -> bool:
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        getattr(obj, "__call__", None)  # noqa: B004 - objects with an async __call__
    )
