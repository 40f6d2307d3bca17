"""The public surface: names, types, and pure helpers behind it."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

import neoq_anyio
from neoq_anyio import (
    DEFAULT_CONNECTION_TIMEOUT,
    FutureJobQuery,
    Handler,
    InvalidJobError,
    Job,
    JobQuery,
    NeoqError,
    PendingJobIDQuery,
)
from neoq_anyio._fingerprint import _go_float, encode_payload
from neoq_anyio._postgres._schema import schema_sql

ROOT = Path(__file__).resolve().parent.parent


def test_every_public_name_lives_in_the_package() -> None:
    for name in neoq_anyio.__all__:
        obj = getattr(neoq_anyio, name)
        module = getattr(obj, "__module__", None)
        if module is not None and not isinstance(obj, str | float):
            assert module == "neoq_anyio", name


def test_design_contract_names_exist() -> None:
    expected = {
        "open_backend",
        "Handler",
        "Job",
        "current_job",
        "current_transaction",
        "JobQuery",
        "PendingJobIDQuery",
        "FutureJobQuery",
        "DEFAULT_CONNECTION_TIMEOUT",
        "ConnectionStringError",
        "DuplicateJobError",
        "NoTransactionError",
        "PoolTimeoutError",
        "NoQueueError",
        "JobDeadlineError",
        "JobTimeoutError",
        "NeoqError",
    }
    assert expected <= set(neoq_anyio.__all__)
    assert DEFAULT_CONNECTION_TIMEOUT == 30
    for query in (JobQuery, PendingJobIDQuery, FutureJobQuery):
        assert "neoq_jobs" in query


def test_every_error_derives_from_neoq_error() -> None:
    errors = [
        getattr(neoq_anyio, n)
        for n in neoq_anyio.__all__
        if isinstance(getattr(neoq_anyio, n), type)
        and issubclass(getattr(neoq_anyio, n), BaseException)
        # Signals a handler raises, not errors neoq_anyio raises.
        and getattr(neoq_anyio, n) not in (neoq_anyio.Snooze, neoq_anyio.Discard)
    ]
    assert len(errors) >= 12
    for error in errors:
        assert issubclass(error, NeoqError), error
        assert error.__doc__, error


def test_job_fields_are_read_only() -> None:
    job = Job("q", {"a": 1}, max_retries=2)
    assert (job.id, job.status, job.retries, job.ran_at, job.error) == (None, "new", 0, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.id = "7"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.queue = "other"  # type: ignore[misc]


def test_handler_normalises_timedelta_timeouts() -> None:
    from datetime import timedelta

    async def handle(job: Job) -> None:
        pass

    assert Handler("q", handle, job_timeout=timedelta(seconds=90)).timeout_seconds == 90
    assert Handler("q", handle, job_timeout=None).timeout_seconds is None


@pytest.mark.parametrize(
    ("payload", "go_json"),
    [
        pytest.param(None, "null", id="nil"),
        pytest.param({}, "{}", id="empty"),
        pytest.param({"b": 1, "a": [True, None]}, '{"a":[true,null],"b":1}', id="sorted"),
        pytest.param(
            {"html": "<a href='x'>&</a>"},
            '{"html":"\\u003ca href=\'x\'\\u003e\\u0026\\u003c/a\\u003e"}',
            id="html",
        ),
        pytest.param({"u": "é\u2028"}, '{"u":"é\\u2028"}', id="unicode"),
        pytest.param({"f": 1.0, "g": 2.5}, '{"f":1,"g":2.5}', id="integral-float"),
        pytest.param({"f": 1e21, "g": 1e-7}, '{"f":1e+21,"g":1e-7}', id="exponents"),
        pytest.param({"f": 1e20}, '{"f":100000000000000000000}', id="large-plain"),
        pytest.param({"n": {"z": 0.000001}}, '{"n":{"z":0.000001}}', id="nested-small"),
    ],
)
def test_fingerprint_matches_go_json_marshal(
    payload: dict[str, object] | None, go_json: str
) -> None:
    _, fingerprint = encode_payload("queue", payload)
    assert fingerprint == hashlib.md5(("queue" + go_json).encode()).hexdigest()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"),
        (-2.25, "-2.25"),
        (123.456, "123.456"),
        (3e-5, "0.00003"),
        (-0.0, "-0"),
        (1.5e-7, "1.5e-7"),
        (1e16, "10000000000000000"),
        (12345678.9, "12345678.9"),
    ],
)
def test_go_float_format(value: float, text: str) -> None:
    assert _go_float(value) == text


def test_payload_text_keeps_python_types() -> None:
    text, _ = encode_payload("q", {"f": 1.0})
    assert text == '{"f":1.0}'  # stored as written: reads back as a float


def test_unencodable_payload_raises() -> None:
    with pytest.raises(InvalidJobError, match="JSON"):
        encode_payload("q", {"s": {1}})


def test_schema_sql_is_the_root_file() -> None:
    assert schema_sql() == (ROOT / "schema.sql").read_text(encoding="utf-8")


def test_wheel_ships_schema_and_marker(tmp_path: Path) -> None:
    hatchling = pytest.importorskip("hatchling.builders.wheel")
    builder = hatchling.WheelBuilder(str(ROOT))
    wheel = next(iter(builder.build(directory=str(tmp_path), versions=["standard"])))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "neoq_anyio/schema.sql" in names
        assert "neoq_anyio/py.typed" in names
        shipped = archive.read("neoq_anyio/schema.sql").decode()
    assert shipped == (ROOT / "schema.sql").read_text(encoding="utf-8")
