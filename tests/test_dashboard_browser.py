"""The dashboard in a real browser: Debian's Chromium, driven by Playwright.

A ``neoq-anyio dashboard --loop trio`` subprocess serves a schema the test
fills through its own backend, whose handlers process what the operator
retries. The test opens the queues page, reads a queue's counts, sees them
refresh without a reload, opens a dead job, presses Retry and watches the
job become processed; then checks that a queue name and a payload made of
markup show as text and run nothing.

It runs on asyncio only: Playwright's async API drives its browser through
asyncio. The dashboard runs on trio here; ``test_web.py`` covers the
command on both loops, and the app on both through httpx.

The screenshot of the queues page goes to the test's temporary directory;
with ``NEOQ_UPDATE_SCREENSHOTS=1`` it also replaces ``docs/img/dashboard.png``,
the one the Observability page shows.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from neoq_anyio import Handler, Job, open_backend

from ._dashboard import dashboard, wait_for_url
from .conftest import Database

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "dashboard.png"
SCRIPT = "<script>window.__pwned = 1</script>"
ATTRIBUTE = "\"'><img src=x onerror=window.__pwned=2>"

needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)",
)
# Any non-zero rate: jobs processed between the dashboard's two looks.
A_RATE = re.compile(r"^[1-9][0-9.]*/min$")


expect.set_options(timeout=15_000)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Playwright's async API runs on asyncio only


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()


def _watch(page: Page) -> list[str]:
    """Collect what must not happen on a page: dialogs, script errors, CSP refusals."""
    trouble: list[str] = []

    async def dismiss(dialog: Any) -> None:
        trouble.append(f"dialog: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", dismiss)
    page.on("pageerror", lambda error: trouble.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            trouble.append(f"console: {message.text}") if message.type == "error" else None
        ),
    )
    return trouble


@needs_chromium
async def test_operator_retries_a_dead_job_in_chromium(dsn: str, db: Database) -> None:
    with anyio.fail_after(90):
        async with open_backend(dsn) as nq:
            reports_down = True
            retried = anyio.Event()

            async def send_email(job: Job) -> None:
                pass

            async def build_report(job: Job) -> None:
                if reports_down:
                    raise RuntimeError("the report service answered 503 Service Unavailable")
                retried.set()

            # A day's worth of queues, in miniature: processed emails and two
            # for later, invoices nobody processes yet, and a dead report.
            later = datetime.now(UTC) + timedelta(hours=2)
            await nq.start(Handler("emails", send_email))
            for i in range(5):
                await nq.enqueue(Job("emails", {"to": f"user{i}@example.com"}))
            for i in range(2):
                await nq.enqueue(Job("emails", {"digest": i}, run_after=later))
            for i in range(3):
                await nq.enqueue(Job("invoices", {"invoice": 1000 + i}))
            await nq.start(Handler("reports", build_report))
            dead_id = await nq.enqueue(Job("reports", {"account": 42}, max_retries=0))
            await nq.enqueue(Job("reports", {"account": 7}, max_retries=3))  # waits for its retry
            await db.wait_for("SELECT count(*) FROM neoq_dead_jobs", lambda n: n == 1, timeout=20)
            await db.wait_for(
                "SELECT count(*) FROM neoq_jobs WHERE status = 'processed'",
                lambda n: n == 5,
                timeout=20,
            )

            async with dashboard(dsn, loop="trio") as server, chromium() as browser:
                url = await wait_for_url(server)
                page = await browser.new_page(viewport={"width": 1180, "height": 400})
                page.set_default_timeout(30_000)  # a loaded CI machine is slow, not broken
                trouble = _watch(page)
                await page.goto(url)

                # The queues page shows each queue's counts.
                reports = page.locator("tr[data-queue='reports']")
                await expect(reports.locator("[data-field=dead]")).to_have_text("1")
                await expect(reports.locator("[data-field=failed]")).to_have_text("1")
                emails = page.locator("tr[data-queue='emails']")
                await expect(emails.locator("[data-field=processed]")).to_have_text("5")
                await expect(emails.locator("[data-field=scheduled]")).to_have_text("2")
                invoices = page.locator("tr[data-queue='invoices']")
                await expect(invoices.locator("[data-field=due]")).to_have_text("3")

                # They refresh in place: new work shows without a reload.
                await page.evaluate("window.__same_page = true")
                for i in range(3):
                    await nq.enqueue(Job("emails", {"to": f"late{i}@example.com"}))
                await nq.enqueue(Job("invoices", {"invoice": 1003}))
                await expect(invoices.locator("[data-field=due]")).to_have_text("4", timeout=15_000)
                await expect(emails.locator("[data-field=processed]")).to_have_text("8")
                await expect(emails.locator("[data-field=throughput]")).to_have_text(
                    A_RATE, timeout=15_000
                )
                assert await page.evaluate("window.__same_page") is True
                shot = await page.screenshot(full_page=True, type="png")
                assert shot.startswith(b"\x89PNG")
                assert len(shot) < 200_000, f"{len(shot)} bytes: too big for the docs"
                if os.environ.get("NEOQ_UPDATE_SCREENSHOTS") == "1":
                    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                    SCREENSHOT.write_bytes(shot)

                # The dead report: open it from its queue's dead count, and retry it.
                await reports.locator("[data-field=dead] a").click()
                await page.locator(f"tr[data-job='{dead_id}'] a").first.click()
                status = page.locator("[data-job-status]")
                await expect(status).to_have_text("dead")
                await expect(page.locator("pre[data-job-field=error]")).to_contain_text(
                    "503 Service Unavailable"
                )
                await expect(page.locator("main")).to_contain_text('"account": 42')
                reports_down = False
                await page.get_by_role("button", name="Retry now").click()
                await expect(page.locator(".notice")).to_contain_text("Retried")
                with anyio.fail_after(20):
                    await retried.wait()
                # The page follows the job by itself until it is processed.
                await expect(status).to_have_text("processed", timeout=15_000)
                await expect(status).to_have_class("badge s-processed")
                assert (
                    await db.value(
                        "SELECT status::text FROM neoq_jobs WHERE id = %s", (int(dead_id),)
                    )
                    == "processed"
                )

                # Markup in a queue name and a payload is shown as text, and runs nothing.
                hostile_id = await nq.enqueue(Job(SCRIPT, {"note": ATTRIBUTE, "html": SCRIPT}))
                await page.goto(url)
                row = page.locator("tr[data-queue]").filter(has_text="window.__pwned = 1")
                await expect(row.locator("td").first).to_have_text(SCRIPT)
                await page.goto(f"{url}/jobs/{hostile_id}")
                await expect(page.locator("main")).to_contain_text(ATTRIBUTE.replace('"', '\\"'))
                await expect(page.locator("dd a").first).to_have_text(SCRIPT)
                assert await page.locator("main img").count() == 0
                assert await page.evaluate("window.__pwned") is None
                assert trouble == []


def test_chromium_is_where_ci_installs_it() -> None:
    """Guard against a silent skip: CI installs Chromium, so the test above runs there."""
    if os.environ.get("CI"):
        assert shutil.which("chromium") == CHROMIUM
