"""The dashboard (``neoq_anyio.web``): the app through httpx's ASGI transport, on
both loops and, where the data matters, both backends; and the
``neoq-anyio dashboard`` command as a real subprocess served by Hypercorn.

The browser test (``test_dashboard_browser.py``) drives the same pages in
Chromium; here every response is read as text, so what the server sends is
checked exactly: escaping, headers, cookies and status codes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from neoq_anyio import (
    Backend,
    ConfigurationError,
    Handler,
    Job,
    MemoryBackend,
    QueueStats,
    open_backend,
)
from neoq_anyio.web import create_app
from neoq_anyio.web._throughput import Throughput

from ._dashboard import dashboard, wait_for_url
from .conftest import wait_until

SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = "\"'><img src=x onerror=alert(1)>"
TOKEN = "s3cret-token-for-tests"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@asynccontextmanager
async def client(app: Any, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", **kwargs) as c:
        yield c


async def csrf_of(c: httpx.AsyncClient, path: str) -> str:
    """The CSRF token of the form on the page at ``path`` (its cookie is now set)."""
    page = await c.get(path)
    assert page.status_code == 200, page.text
    found = _CSRF.search(page.text)
    assert found is not None, "no form on the page"
    return found[1]


async def dead_job(nq: Backend, queue: str, payload: dict[str, Any], error: str) -> str:
    """A job that failed once with ``error`` and so is dead (``max_retries=0``)."""

    async def fail(job: Job) -> None:
        raise RuntimeError(error)

    job_id = await nq.enqueue(Job(queue, payload, max_retries=0))
    await nq.start(Handler(queue, fail))
    await wait_until(lambda: _status_is(nq, job_id, "dead"), timeout=20)
    return job_id


async def _status_is(nq: Backend, job_id: str, status: str) -> bool:
    job = await nq.get_job(job_id)
    return job is not None and job.status == status


def _assert_no_raw_markup(text: str) -> None:
    for raw in (SCRIPT, ATTRIBUTE, "<img", "onerror=alert(1)>"):
        assert raw not in text


async def test_every_value_is_escaped(connection_string: str) -> None:
    """A queue name and a payload holding markup show as text, on every page and in JSON."""
    with anyio.fail_after(30):
        async with open_backend(connection_string) as nq:
            payload = {"note": SCRIPT, ATTRIBUTE: [ATTRIBUTE]}
            job_id = await dead_job(nq, SCRIPT, payload, error=ATTRIBUTE)
            other = await nq.enqueue(
                Job(ATTRIBUTE[:40], {"x": SCRIPT}, run_after=datetime.now(UTC) + timedelta(hours=1))
            )
            app = create_app(nq)
            async with client(app) as c:
                for path in (
                    "/",
                    "/jobs",
                    f"/jobs?queue={SCRIPT}",
                    f"/jobs?queue={ATTRIBUTE[:40]}&status=new",
                    f"/jobs/{job_id}",
                    f"/jobs/{other}",
                ):
                    page = await c.get(path)
                    assert page.status_code == 200, (path, page.text)
                    assert page.headers["content-type"].startswith("text/html")
                    _assert_no_raw_markup(page.text)
                    # The page's own script is its only one, and carries the CSP nonce.
                    nonce = re.search(r"'nonce-([^']+)'", page.headers["content-security-policy"])
                    assert nonce is not None
                    assert page.text.count("<script") == 1
                    assert f'<script nonce="{nonce[1]}">' in page.text
                detail = (await c.get(f"/jobs/{job_id}")).text
                assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail  # the queue, as text
                assert "&quot;&#x27;&gt;&lt;img src=x onerror=alert(1)&gt;" in detail  # the error
                queues = (await c.get("/")).text
                assert 'data-queue="&lt;script&gt;alert(1)&lt;/script&gt;"' in queues

                stats = await c.get("/api/stats")
                assert stats.headers["content-type"] == "application/json"
                assert stats.headers["x-content-type-options"] == "nosniff"
                assert {q["queue"] for q in stats.json()["queues"]} == {SCRIPT, ATTRIBUTE[:40]}
                document = (await c.get(f"/api/jobs/{job_id}")).json()
                assert document["payload"] == payload
                assert document["queue"] == SCRIPT
                assert ATTRIBUTE in document["error"]


async def test_a_token_guards_every_page_and_metrics() -> None:
    """Without the token: 401 everywhere; with it as a bearer header, a cookie from
    ``?token=`` or from the login form: the pages. The token never shows in a page
    or a cookie."""
    with anyio.fail_after(30):
        async with open_backend() as nq:
            job_id = await nq.enqueue(Job("emails", {"to": "ada@example.com"}))
            app = create_app(nq, token=TOKEN)
            paths = ["/", "/jobs", f"/jobs/{job_id}", "/api/stats", f"/api/jobs/{job_id}"]
            async with client(app) as c:
                for path in [*paths, "/metrics"]:
                    for headers in (
                        {},
                        {"Authorization": "Bearer wrong"},
                        {"Authorization": TOKEN},
                    ):
                        refused = await c.get(path, headers=headers)
                        assert refused.status_code == 401, (path, headers)
                        assert refused.headers["www-authenticate"].startswith("Bearer")
                        assert "emails" not in refused.text
                assert (await c.get("/?token=wrong")).status_code == 401
                assert "neoq_dashboard_session" not in c.cookies
                posted = await c.post(f"/jobs/{job_id}/delete", data={"csrf": "x" * 43})
                assert posted.status_code == 401

            async with client(app, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
                for path in paths:
                    assert (await c.get(path)).status_code == 200, path
                assert (await c.get("/metrics")).status_code in (200, 404)  # per prometheus_client
                assert "neoq_dashboard_session" not in c.cookies

            async with client(app) as c:
                first = await c.get(f"/jobs/{job_id}?token={TOKEN}")
                assert first.status_code == 200
                assert TOKEN not in first.text
                session = next(
                    value
                    for value in first.headers.get_list("set-cookie")
                    if value.startswith("neoq_dashboard_session=")
                )
                assert "HttpOnly" in session
                assert "SameSite=strict" in session
                assert TOKEN not in session
                for path in paths:  # the cookie alone now
                    assert (await c.get(path)).status_code == 200, path
                # Logging out ends the session.
                csrf = await csrf_of(c, "/")
                out = await c.post("/logout", data={"csrf": csrf})
                assert out.status_code == 303
                assert (await c.get("/")).status_code == 401

            async with client(app) as c:
                login = await c.get("/jobs?status=new")
                assert login.status_code == 401
                assert 'name="next" value="/jobs?status=new"' in login.text
                wrong = await c.post("/login", data={"token": "nope", "next": "/jobs"})
                assert wrong.status_code == 401
                good = await c.post("/login", data={"token": TOKEN, "next": "/jobs?status=new"})
                assert good.status_code == 303
                assert good.headers["location"] == "/jobs?status=new"
                assert (await c.get("/jobs")).status_code == 200
                # No open redirect through ``next``.
                away = await c.post("/login", data={"token": TOKEN, "next": "//evil.example/"})
                assert away.headers["location"] == "/"


async def test_read_only_shows_no_actions_and_refuses_them(connection_string: str) -> None:
    with anyio.fail_after(30):
        async with open_backend(connection_string) as nq:
            job_id = await dead_job(nq, "reports", {"n": 1}, error="boom")
            app = create_app(nq, read_only=True)
            async with client(app) as c:
                page = await c.get(f"/jobs/{job_id}")
                assert page.status_code == 200
                assert "read-only" in page.text
                assert '<form method="post"' not in page.text
                assert "Retry" not in page.text
                assert "Delete" not in page.text
                for action in ("retry", "cancel", "delete"):
                    refused = await c.post(f"/jobs/{job_id}/{action}", data={"csrf": "x" * 43})
                    assert refused.status_code == 403, action
                    assert (await c.get(f"/jobs/{job_id}/{action}")).status_code == 405
            job = await nq.get_job(job_id)
            assert job is not None
            assert job.status == "dead"


async def test_retry_cancel_and_delete(connection_string: str) -> None:
    """The buttons' POSTs: a dead job retried runs again; a future job cancelled is
    dead; a job deleted is gone; actions that cannot apply say so."""
    with anyio.fail_after(30):
        async with open_backend(connection_string) as nq:
            ran = anyio.Event()
            failing = True

            async def handle(job: Job) -> None:
                if failing:
                    raise RuntimeError("down")
                ran.set()

            dead_id = await nq.enqueue(Job("reports", {"n": 1}, max_retries=0))
            await nq.start(Handler("reports", handle))
            await wait_until(lambda: _status_is(nq, dead_id, "dead"), timeout=20)
            later = datetime.now(UTC) + timedelta(hours=1)
            future_id = await nq.enqueue(Job("later", {"n": 2}, run_after=later))
            gone_id = await nq.enqueue(Job("later", {"n": 3}, run_after=later))

            app = create_app(nq)
            async with client(app) as c:
                csrf = await csrf_of(c, f"/jobs/{dead_id}")
                failing = False
                retried = await c.post(f"/jobs/{dead_id}/retry", data={"csrf": csrf})
                assert retried.status_code == 303
                assert retried.headers["location"] == f"/jobs/{dead_id}?done=retry"
                await ran.wait()
                await wait_until(lambda: _status_is(nq, dead_id, "processed"), timeout=20)
                shown = await c.get(retried.headers["location"])
                assert "Retried: the job is due now." in shown.text

                cancelled = await c.post(f"/jobs/{future_id}/cancel", data={"csrf": csrf})
                assert cancelled.status_code == 303
                job = await nq.get_job(future_id)
                assert job is not None
                assert job.status == "dead"
                assert job.error == "cancelled"
                again = await c.post(f"/jobs/{future_id}/cancel", data={"csrf": csrf})
                assert again.status_code == 409
                assert "cannot be cancelled" in again.text

                deleted = await c.post(f"/jobs/{gone_id}/delete", data={"csrf": csrf})
                assert deleted.status_code == 303
                assert deleted.headers["location"] == "/jobs?done=delete"
                assert await nq.get_job(gone_id) is None
                assert (await c.get(f"/jobs/{gone_id}")).status_code == 404
                assert (await c.get(f"/api/jobs/{gone_id}")).status_code == 404
                unknown = await c.post("/jobs/999999/retry", data={"csrf": csrf})
                assert unknown.status_code == 404
                assert (
                    await c.post(f"/jobs/{gone_id}/delete", data={"csrf": csrf})
                ).status_code == 409
                assert (await c.get("/jobs/not-an-id")).status_code == 404


async def test_forged_posts_are_refused() -> None:
    """A POST needs the form's CSRF token matching its cookie, and no cross-site
    mark; one authenticated by its bearer header needs neither."""
    with anyio.fail_after(30):
        async with open_backend() as nq:
            later = datetime.now(UTC) + timedelta(hours=1)
            job_id = await nq.enqueue(Job("later", {"n": 1}, run_after=later))
            async with client(create_app(nq)) as c:
                assert (await c.post(f"/jobs/{job_id}/cancel")).status_code == 403
                csrf = await csrf_of(c, f"/jobs/{job_id}")
                wrong = await c.post(f"/jobs/{job_id}/cancel", data={"csrf": "y" * len(csrf)})
                assert wrong.status_code == 403
                cross = await c.post(
                    f"/jobs/{job_id}/cancel",
                    data={"csrf": csrf},
                    headers={"Sec-Fetch-Site": "cross-site"},
                )
                assert cross.status_code == 403
                assert "another site" in cross.text
            async with client(create_app(nq)) as stranger:  # no cookie: another browser
                forged = await stranger.post(f"/jobs/{job_id}/cancel", data={"csrf": csrf})
                assert forged.status_code == 403
            job = await nq.get_job(job_id)
            assert job is not None
            assert job.status == "new"

            bearer = {"Authorization": f"Bearer {TOKEN}"}
            async with client(create_app(nq, token=TOKEN), headers=bearer) as c:
                assert (await c.post(f"/jobs/{job_id}/cancel")).status_code == 303
            job = await nq.get_job(job_id)
            assert job is not None
            assert job.status == "dead"


async def test_job_list_filters_and_pages(connection_string: str) -> None:
    with anyio.fail_after(30):
        async with open_backend(connection_string) as nq:
            later = datetime.now(UTC) + timedelta(hours=1)
            a = [await nq.enqueue(Job("a", {"i": i}, run_after=later)) for i in range(5)]
            b = [await nq.enqueue(Job("b", {"i": i}, run_after=later)) for i in range(2)]
            assert await nq.cancel_job(a[1])
            async with client(create_app(nq)) as c:
                seen: list[str] = []
                url: str | None = "/jobs?queue=a&limit=2"
                while url is not None:
                    page = await c.get(url)
                    assert page.status_code == 200, page.text
                    ids = re.findall(r'<tr data-job="(\d+)">', page.text)
                    assert 0 < len(ids) <= 2
                    seen += ids
                    older = re.search(r'href="([^"]+)" rel="next"', page.text)
                    url = older[1].replace("&amp;", "&") if older else None
                assert seen == list(reversed(a))  # newest first, each once

                everything = await c.get("/jobs")
                assert re.findall(r'<tr data-job="(\d+)">', everything.text) == list(
                    reversed(a + b)
                )
                dead = await c.get("/jobs?status=dead")
                assert re.findall(r'<tr data-job="(\d+)">', dead.text) == [a[1]]
                none = await c.get("/jobs?queue=b&status=dead")
                assert "No jobs match." in none.text
                for bad in ("status=lost", "limit=0", "limit=x", "limit=501", "before=abc"):
                    refused = await c.get(f"/jobs?{bad}")
                    assert refused.status_code == 400, bad


async def test_hosts_outside_the_allowed_ones_are_refused() -> None:
    async with open_backend() as nq:
        app = create_app(nq, allowed_hosts=["localhost", "127.0.0.1", "::1"])
        async with client(app) as c:
            for host in ("localhost:8080", "127.0.0.1", "[::1]:8080"):
                assert (await c.get("/", headers={"Host": host})).status_code == 200, host
            rebound = await c.get("/", headers={"Host": "attacker.example:8080"})
            assert rebound.status_code == 400
            assert rebound.headers["x-frame-options"] == "DENY"


async def test_metrics_without_prometheus_client_is_404(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    async with open_backend() as nq, client(create_app(nq)) as c:
        missing = await c.get("/metrics")
        assert missing.status_code == 404
        assert "prometheus_client" in missing.text


async def test_metrics_serve_the_default_registry() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    async with open_backend() as nq, client(create_app(nq)) as c:
        metrics = await c.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
        assert "python_info" in metrics.text or "process_" in metrics.text


async def test_links_follow_the_mount_path() -> None:
    async with open_backend() as nq:
        job_id = await nq.enqueue(Job("emails", {}))
        outer = Starlette(routes=[Mount("/ops/neoq", app=create_app(nq))])
        async with client(outer) as c:
            page = await c.get("/ops/neoq/")
            assert page.status_code == 200
            assert 'href="/ops/neoq/jobs?queue=emails"' in page.text
            assert 'data-stats-url="/ops/neoq/api/stats"' in page.text
            assert "Path=/ops/neoq;" in page.headers["set-cookie"]  # the CSRF cookie
            detail = await c.get(f"/ops/neoq/jobs/{job_id}")
            assert f'action="/ops/neoq/jobs/{job_id}/retry"' in detail.text
            csrf = _CSRF.search(detail.text)
            assert csrf is not None
            done = await c.post(f"/ops/neoq/jobs/{job_id}/delete", data={"csrf": csrf[1]})
            assert done.headers["location"] == "/ops/neoq/jobs?done=delete"


async def test_counts_and_throughput_as_json() -> None:
    async with open_backend() as nq:
        done = anyio.Event()

        async def handle(job: Job) -> None:
            if job.payload and job.payload.get("last"):
                done.set()

        await nq.start(Handler("emails", handle))
        async with client(create_app(nq)) as c:
            first = (await c.get("/api/stats")).json()
            assert first == {"queues": []}
            for i in range(3):
                await nq.enqueue(Job("emails", {"i": i, "last": i == 2}))
            with anyio.fail_after(10):
                await done.wait()
            await wait_until(lambda: _processed(nq, "emails", 3))
            (row,) = (await c.get("/api/stats")).json()["queues"]
            assert row["queue"] == "emails"
            assert row["processed"] == 3
            assert row["throughput_per_minute"] is None  # the first sample that knows it
            assert row["cells"]["throughput"] == "—"


async def _processed(nq: Backend, queue: str, count: int) -> bool:
    return any(s.queue == queue and s.processed == count for s in await nq.queue_stats())


def _stats(queue: str, processed: int) -> QueueStats:
    return QueueStats(queue, 0, 0, 0, 0, processed, 0, None, False)


def test_throughput_is_the_growth_of_processed_counts_over_the_last_minute() -> None:
    meter = Throughput()
    assert meter.record(100.0, [_stats("a", 10)]) == {"a": None}  # one sample: no rate
    assert meter.record(100.5, [_stats("a", 11)]) == {"a": None}  # too close to compare
    rate = meter.record(110.0, [_stats("a", 20), _stats("b", 5)])
    assert rate["a"] is not None
    assert rate["a"].per_minute == pytest.approx(60.0)
    assert rate["a"].over_seconds == pytest.approx(10.0)
    assert rate["b"] is None  # new queue
    later = meter.record(130.0, [_stats("a", 30), _stats("b", 25)])
    assert later["a"] is not None
    assert later["a"].per_minute == pytest.approx(40.0)
    assert later["b"] is not None
    assert later["b"].per_minute == pytest.approx(60.0)
    pruned = meter.record(140.0, [_stats("a", 3), _stats("b", 25)])
    assert pruned["a"] is None  # the count fell: retention pruned, no honest figure
    old = meter.record(200.0, [_stats("a", 3), _stats("b", 25)])
    assert old["b"] is not None
    assert old["b"].over_seconds == pytest.approx(60.0)


def test_public_surface() -> None:
    import neoq_anyio.web

    assert neoq_anyio.web.__all__ == ("create_app",)
    assert create_app.__module__ == "neoq_anyio.web"
    assert "Raises:" in (create_app.__doc__ or "")


def test_create_app_refuses_bad_arguments() -> None:
    nq = object.__new__(MemoryBackend)  # never opened: create_app only checks its type
    for bad in (
        lambda: create_app(object()),  # type: ignore[arg-type]
        lambda: create_app(nq, token=""),
        lambda: create_app(nq, token=b"bytes"),  # type: ignore[arg-type]
        lambda: create_app(nq, allowed_hosts="localhost"),
        lambda: create_app(nq, allowed_hosts=["localhost", ""]),
    ):
        with pytest.raises(ConfigurationError):
            bad()


def test_web_needs_its_extra_and_the_core_does_not() -> None:
    code = (
        "import sys\n"
        "sys.modules['starlette'] = None\n"  # as if the web extra were not installed
        "import neoq_anyio\n"
        "try:\n"
        "    import neoq_anyio.web\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "from neoq_anyio._cli import main\n"
        "sys.exit(main(['dashboard', '--dsn', 'postgresql://127.0.0.1:1/unused']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.stdout.strip() == (
        "neoq_anyio.web needs the web extra: pip install 'neoq_anyio[web]'"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "neoq-anyio: error: the dashboard needs the web extra: pip install 'neoq_anyio[web]'"
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param(["--token", ""], {}, "--token is empty", id="empty-token"),
        pytest.param([], {"NEOQ_DASHBOARD_TOKEN": ""}, "set but empty", id="empty-variable"),
        pytest.param(["--port", "70000"], {}, "--port", id="port"),
        pytest.param([], {"NEOQ_DSN": ""}, "no database", id="no-dsn"),
    ],
)
def test_dashboard_usage_errors_exit_2(args: list[str], env: dict[str, str], message: str) -> None:
    environment = {**os.environ, "NEOQ_DSN": "postgresql://127.0.0.1:1/unused", **env}
    result = subprocess.run(
        [sys.executable, "-m", "neoq_anyio", "dashboard", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("neoq-anyio: error:")
    assert message in line


def test_dashboard_on_a_port_in_use_exits_1_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "neoq_anyio", "dashboard", "--port", str(port)],
            env={**os.environ, "NEOQ_DSN": "postgresql://127.0.0.1:1/unused"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        f"neoq-anyio: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


async def test_dashboard_command_serves_until_sigterm(dsn: str, anyio_backend_name: str) -> None:
    """``neoq-anyio dashboard`` on the test's loop, behind a token and read-only:
    real HTTP through Hypercorn, then SIGTERM stops it with status 0."""
    with anyio.fail_after(60):
        async with open_backend(dsn) as nq:
            job_id = await nq.enqueue(Job("emails", {"to": "ada@example.com"}))
        args = ("--token", TOKEN, "--read-only")
        async with dashboard(dsn, *args, loop=anyio_backend_name) as running:
            url = await wait_for_url(running)
            assert url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                assert (await c.get("/")).status_code == 401
                bearer = {"Authorization": f"Bearer {TOKEN}"}
                page = await c.get(f"/jobs/{job_id}", headers=bearer)
                assert page.status_code == 200
                assert "ada@example.com" in page.text
                assert "Retry" not in page.text
                stats = await c.get("/api/stats", headers=bearer)
                assert [q["queue"] for q in stats.json()["queues"]] == ["emails"]
                refused = await c.post(f"/jobs/{job_id}/delete", headers=bearer)
                assert refused.status_code == 403
                # On a loopback address, other host names are answered too: a token
                # keeps DNS-rebinding pages out (they cannot get the cookie).
                named = await c.get("/", headers={**bearer, "Host": "dash.example"})
                assert named.status_code == 200
            running.signal(signal.SIGTERM)
            assert await running.exit_status() == 0, running.stderr
        assert "Traceback" not in running.stderr
        assert TOKEN not in running.stderr
        assert "dashboard stopped" in running.stderr


async def test_dashboard_command_without_token_answers_loopback_names_only(
    dsn: str, anyio_backend_name: str
) -> None:
    with anyio.fail_after(60):
        async with dashboard(dsn, loop=anyio_backend_name) as running:
            url = await wait_for_url(running)
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                assert (await c.get("/")).status_code == 200
                port = url.rsplit(":", 1)[1]
                assert (await c.get("/", headers={"Host": f"localhost:{port}"})).status_code == 200
                rebound = await c.get("/", headers={"Host": f"attacker.example:{port}"})
                assert rebound.status_code == 400
                assert "--allowed-host" in rebound.text
            running.signal(signal.SIGINT)
            assert await running.exit_status() == 0, running.stderr


def test_json_documents_match_the_command_line() -> None:
    """``/api/jobs/ID`` carries the fields the command line's ``--json`` prints."""
    from neoq_anyio._cli._base import job_document as cli_document
    from neoq_anyio.web._pages import job_document

    job = Job("emails", {"to": "x"})._evolve(id="7", created_at=datetime.now(UTC))
    ours = job_document(job, datetime.now(UTC))
    assert {k: v for k, v in ours.items() if k in cli_document(job)} == cli_document(job)
    json.dumps(ours)  # serialisable
