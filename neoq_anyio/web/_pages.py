"""The dashboard's pages, drawn from plain values: no I/O, no request objects.

Every piece of markup comes from ``_html.html``, which escapes each value;
URLs are built with ``urlencode``/``quote`` first and escaped as attribute
values after. ``cells`` functions give the same display strings the page
scripts write with ``textContent`` when they refresh a page.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from neoq_anyio import _models as models

from ._html import CSS, SCRIPT, Markup, html, join

if TYPE_CHECKING:
    from collections.abc import Sequence

    from neoq_anyio._models import Job, QueueStats

    from ._throughput import Rate

__all__ = [
    "FINAL_STATUSES",
    "JOB_STATUSES",
    "Chrome",
    "Links",
    "error_page",
    "format_duration",
    "format_relative",
    "format_time",
    "job_cells",
    "job_document",
    "job_page",
    "jobs_page",
    "login_page",
    "overview_page",
    "queue_cells",
    "queue_document",
]

JOB_STATUSES = ("new", "running", "failed", "processed", "dead")
FINAL_STATUSES = frozenset({"processed", "dead"})
_COUNTS = ("due", "scheduled", "running", "failed", "processed", "dead")
# Counts that are a job status, so they link to the jobs of that status.
_STATUS_COUNTS = frozenset({"running", "failed", "processed", "dead"})
_MAX_SHOWN = 100_000  # characters of a payload or error shown on a page
_NOTICES = {
    "retry": "Retried: the job is due now.",
    "cancel": "Cancelled: the job moved to the dead jobs, with the error “cancelled”.",
    "delete": "Deleted the job.",
}


class Links:
    """URLs inside the dashboard, under the path it is served at (``root``)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def home(self) -> str:
        return self.root + "/"

    def jobs(self, **query: str | None) -> str:
        params = {name: value for name, value in query.items() if value}
        return self.root + "/jobs" + ("?" + urlencode(params) if params else "")

    def job(self, job_id: str, action: str | None = None) -> str:
        url = f"{self.root}/jobs/{quote(job_id, safe='')}"
        return f"{url}/{action}" if action else url

    def queue(self, queue: str, action: str) -> str:
        return f"{self.root}/queues/{quote(queue, safe='')}/{action}"

    def api_stats(self) -> str:
        return self.root + "/api/stats"

    def api_job(self, job_id: str) -> str:
        return f"{self.root}/api/jobs/{quote(job_id, safe='')}"

    def login(self) -> str:
        return self.root + "/login"

    def logout(self) -> str:
        return self.root + "/logout"


class Chrome:
    """What every page around its content shows, and the nonce its script and style carry."""

    def __init__(
        self, links: Links, *, nonce: str, read_only: bool, csrf: str, logout: bool
    ) -> None:
        self.links = links
        self.nonce = nonce
        self.read_only = read_only
        self.csrf = csrf
        self.logout = logout

    def page(self, title: str, content: Markup) -> Markup:
        links = self.links
        right: list[Markup] = []
        if self.read_only:
            right.append(html('<span class="tag">read-only</span>'))
        if self.logout:
            right.append(
                html(
                    '<form method="post" action="{action}"><input type="hidden" name="csrf" '
                    'value="{csrf}"><button type="submit">Log out</button></form>',
                    action=links.logout(),
                    csrf=self.csrf,
                )
            )
        return html(
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="referrer" content="same-origin">'
            '<link rel="icon" href="data:,">'
            "<title>{title} · neoq_anyio</title>"
            '<style nonce="{nonce}">{css}</style></head><body>'
            '<header><a class="brand" href="{home}">neoq_anyio</a>'
            '<a href="{home}">Queues</a><a href="{jobs}">Jobs</a>'
            '<span class="right"><span class="sub" id="refreshed"></span>{right}</span></header>'
            "<main>{content}</main>"
            '<script nonce="{nonce}">{script}</script></body></html>\n',
            title=title,
            nonce=self.nonce,
            css=Markup(CSS),
            home=links.home(),
            jobs=links.jobs(),
            right=join(right),
            content=content,
            script=Markup(SCRIPT),
        )


# -- formatting -----------------------------------------------------------------------


def format_time(value: datetime | None, now: datetime) -> str:
    """``2026-05-04 13:02:07 UTC (3 min ago)``; an em dash for no time."""
    if value is None:
        return "—"
    stamp = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stamp} ({format_relative(value, now)})"


def format_relative(value: datetime, now: datetime) -> str:
    """``3 min ago``, ``in 2 h``, or ``now``."""
    seconds = (now - value).total_seconds()
    if abs(seconds) < 1:
        return "now"
    relative = format_duration(abs(seconds))
    return f"{relative} ago" if seconds > 0 else f"in {relative}"


def _when(value: datetime | None, now: datetime) -> Markup:
    """A time in a table: how long ago, with the full time as its tooltip."""
    if value is None:
        return html("—")
    return html(
        '<time datetime="{iso}" title="{full}">{relative}</time>',
        iso=value.isoformat(),
        full=value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        relative=format_relative(value, now),
    )


def format_duration(seconds: float) -> str:
    """A rounded duration: ``42 s``, ``3 min``, ``2 h 5 min``, ``3 d 4 h``."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, _ = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def format_rate(rate: Rate | None) -> str:
    if rate is None:
        return "—"
    shown = f"{rate.per_minute:.0f}" if rate.per_minute >= 10 else f"{rate.per_minute:.1f}"
    return f"{shown}/min"


def _retries(job: Job) -> str:
    if job.max_retries is None:
        return str(job.retries)
    return f"{job.retries} of {job.max_retries}"


def _clip(text: str, size: int) -> str:
    return text if len(text) <= size else text[: size - 1] + "…"


def _payload_text(job: Job) -> str:
    text = json.dumps(job.payload, indent=2, ensure_ascii=False, sort_keys=True)
    if len(text) > _MAX_SHOWN:
        return text[:_MAX_SHOWN] + f"\n… ({len(text) - _MAX_SHOWN} more characters)"
    return text


def _badge(status: str, **attributes: str) -> Markup:
    css = status if status in JOB_STATUSES else "paused"
    extra = join(
        html(' {name}="{value}"', name=Markup(name), value=value)
        for name, value in attributes.items()
    )
    return html(
        '<span class="badge s-{css}"{extra}>{status}</span>', css=css, status=status, extra=extra
    )


# -- queues ---------------------------------------------------------------------------


def queue_cells(stat: QueueStats, rate: Rate | None) -> dict[str, str]:
    """The display strings of a queue's row, by field."""
    cells = {name: str(getattr(stat, name)) for name in _COUNTS}
    cells["oldest_due"] = (
        format_duration(stat.oldest_due_seconds) if stat.oldest_due_seconds is not None else "—"
    )
    cells["throughput"] = format_rate(rate)
    cells["state"] = "paused" if stat.paused else "active"
    return cells


def queue_document(stat: QueueStats, rate: Rate | None) -> dict[str, Any]:
    """A queue as ``/api/stats`` serves it: its counts, its rate, and their display."""
    return {
        "queue": stat.queue,
        **{name: getattr(stat, name) for name in _COUNTS},
        "oldest_due_seconds": stat.oldest_due_seconds,
        "paused": stat.paused,
        "throughput_per_minute": rate.per_minute if rate is not None else None,
        "throughput_over_seconds": rate.over_seconds if rate is not None else None,
        "cells": queue_cells(stat, rate),
    }


def _queue_row(chrome: Chrome, stat: QueueStats, rate: Rate | None) -> Markup:
    links = chrome.links
    cells = queue_cells(stat, rate)
    counts: list[Markup] = []
    for name in _COUNTS:
        value = getattr(stat, name)
        css = f"num c-{name}" + (" zero" if value == 0 else "")
        text: Markup = html("{text}", text=cells[name])
        if name in _STATUS_COUNTS:
            text = html(
                '<a href="{href}">{text}</a>',
                href=links.jobs(queue=stat.queue, status=name),
                text=cells[name],
            )
        counts.append(
            html('<td class="{css}" data-field="{name}">{text}</td>', css=css, name=name, text=text)
        )
    state = _badge("paused") if stat.paused else Markup("")
    return html(
        '<tr data-queue="{queue}" data-paused="{paused}"><td class="wrap">'
        '<a href="{href}">{queue}</a> {state}</td>'
        '{counts}<td class="num" data-field="oldest_due">{oldest}</td>'
        '<td class="num" data-field="throughput">{rate}</td>{toggle}</tr>',
        queue=stat.queue,
        paused="true" if stat.paused else "false",
        href=links.jobs(queue=stat.queue),
        state=state,
        toggle=_pause_toggle(chrome, stat),
        counts=join(counts),
        oldest=cells["oldest_due"],
        rate=cells["throughput"],
    )


def _pause_toggle(chrome: Chrome, stat: QueueStats) -> Markup:
    """The queue's Pause or Resume button, in a cell; none when read-only."""
    if chrome.read_only:
        return Markup("")
    action, label, title = (
        ("resume", "Resume", "let workers take this queue's jobs again")
        if stat.paused
        else ("pause", "Pause", "stop every worker taking this queue's jobs until resumed")
    )
    return html(
        '<td><form class="inline" method="post" action="{action}">'
        '<input type="hidden" name="csrf" value="{csrf}">'
        '<button type="submit" title="{title}">{label}</button></form></td>',
        action=chrome.links.queue(stat.queue, action),
        csrf=chrome.csrf,
        title=title,
        label=label,
    )


def overview_page(
    chrome: Chrome,
    stats: Sequence[QueueStats],
    rates: dict[str, Rate | None],
    dead: Sequence[Job],
    now: datetime,
) -> Markup:
    links = chrome.links
    if stats:
        rows = join(_queue_row(chrome, stat, rates.get(stat.queue)) for stat in stats)
        table = html(
            '<table data-stats-url="{api}" data-refresh-ms="5000"><thead><tr><th>Queue</th>'
            '<th class="num" title="runnable now">Due</th>'
            '<th class="num" title="new jobs whose run_after is ahead">Scheduled</th>'
            '<th class="num" title="leased by a worker now (lease mode)">Running</th>'
            '<th class="num" title="failed, waiting for their retry">Failed</th>'
            '<th class="num" title="processed jobs kept by retention">Processed</th>'
            '<th class="num">Dead</th>'
            '<th class="num" title="how long the oldest due job has waited">Oldest due</th>'
            '<th class="num" title="growth of the processed count over the last minute this '
            'dashboard watched; pruning makes it read low">Processed / min</th>{toggle}'
            "</tr></thead><tbody>{rows}</tbody></table>"
            '<p class="sub">Counts refresh every 5 s. Processed / min: the growth of the '
            "processed count over the last minute this dashboard watched (shown from its "
            "second look on); retention pruning makes it read low.</p>",
            api=links.api_stats(),
            rows=rows,
            toggle=Markup("") if chrome.read_only else html("<th></th>"),
        )
    else:
        table = html(
            '<p class="empty" data-stats-url="{api}">No jobs yet: queues show up here once '
            "they hold jobs.</p>",
            api=links.api_stats(),
        )
    return chrome.page(
        "Queues",
        html(
            "<h1>Queues</h1>{table}<h2>Latest dead jobs</h2>{dead}",
            table=table,
            dead=_job_table(links, dead, now, empty="No dead jobs."),
        ),
    )


# -- jobs -----------------------------------------------------------------------------


def _job_table(links: Links, jobs: Sequence[Job], now: datetime, *, empty: str) -> Markup:
    if not jobs:
        return html('<p class="empty">{empty}</p>', empty=empty)
    rows = join(
        html(
            '<tr data-job="{id}"><td><a href="{href}">{id}</a></td>'
            '<td class="wrap"><a href="{queue_href}">{queue}</a></td><td>{status}</td>'
            '<td class="num">{retries}</td><td>{run_after}</td><td>{ran_at}</td>'
            '<td>{created_at}</td><td class="wrap">{error}</td></tr>',
            id=job.id or "",
            href=links.job(job.id or ""),
            queue_href=links.jobs(queue=job.queue),
            queue=job.queue,
            status=_badge(job.status),
            retries=_retries(job),
            run_after=_when(job.run_after, now),
            ran_at=_when(job.ran_at, now),
            created_at=_when(job.created_at, now),
            error=_clip(job.error or "", 120),
        )
        for job in jobs
    )
    return html(
        "<table><thead><tr><th>ID</th><th>Queue</th><th>Status</th>"
        '<th class="num">Retries</th><th>Run after</th><th>Ran at</th>'
        '<th title="for a dead job: when it died">Created / died</th><th>Error</th></tr>'
        "</thead><tbody>{rows}</tbody></table>",
        rows=rows,
    )


def jobs_page(
    chrome: Chrome,
    jobs: Sequence[Job],
    *,
    queue: str | None,
    status: str | None,
    queues: Sequence[str],
    before: str | None,
    older: str | None,
    limit: str | None,
    notice: str | None,
    now: datetime,
) -> Markup:
    """A page of jobs, newest first; ``older`` is the ``before`` of the next page, and
    ``limit`` the page size when not the default."""
    links = chrome.links
    queue_options = join(
        html('<option value="{q}"{sel}>{q}</option>', q=name, sel=_selected(name == queue))
        for name in sorted({*queues, *([queue] if queue else [])})
    )
    status_options = join(
        html('<option value="{s}"{sel}>{s}</option>', s=name, sel=_selected(name == status))
        for name in JOB_STATUSES
    )
    pager: list[Markup] = []
    if before:
        newest = links.jobs(queue=queue, status=status, limit=limit)
        pager.append(html('<a href="{href}">« Newest</a>', href=newest))
    if older:
        pager.append(
            html(
                '<a href="{href}" rel="next">Older »</a>',
                href=links.jobs(queue=queue, status=status, before=older, limit=limit),
            )
        )
    title = "Jobs" + (f" of {queue}" if queue else "") + (f", {status}" if status else "")
    return chrome.page(
        title,
        html(
            "{notice}<h1>{title}</h1>"
            '<form class="filters" method="get" action="{action}">'
            '<label>Queue<select name="queue"><option value="">all queues</option>'
            "{queue_options}</select></label>"
            '<label>Status<select name="status"><option value="">any status</option>'
            "{status_options}</select></label>"
            "{keep_limit}"
            '<button type="submit">Filter</button></form>'
            '{table}<div class="pager">{pager}</div>',
            notice=_notice(notice),
            title=title,
            action=links.jobs(),
            queue_options=queue_options,
            status_options=status_options,
            keep_limit=html('<input type="hidden" name="limit" value="{n}">', n=limit)
            if limit
            else Markup(""),
            table=_job_table(links, jobs, now, empty="No jobs match."),
            pager=join(pager),
        ),
    )


def _selected(yes: bool) -> Markup:
    return Markup(" selected") if yes else Markup("")


def _notice(key: str | None) -> Markup:
    text = _NOTICES.get(key or "")
    return html('<div class="notice" role="status">{text}</div>', text=text) if text else Markup("")


def job_cells(job: Job, now: datetime) -> dict[str, str]:
    """The display strings of a job's page, by field."""
    return {
        "status": job.status,
        "retries": _retries(job),
        "run_after": format_time(job.run_after, now),
        "ran_at": format_time(job.ran_at, now),
        "created_at": format_time(job.created_at, now),
        "deadline": format_time(job.deadline, now),
        "error": job.error or "",
    }


def job_document(job: Job, now: datetime) -> dict[str, Any]:
    """A job as ``/api/jobs/ID`` serves it: the command line's ``--json`` fields,
    its deadline, and its table cells for display."""
    return {
        **models.job_document(job),
        "deadline": job.deadline.isoformat() if job.deadline is not None else None,
        "cells": job_cells(job, now),
    }


def job_page(chrome: Chrome, job: Job, *, notice: str | None, now: datetime) -> Markup:
    links = chrome.links
    job_id = job.id or ""
    cells = job_cells(job, now)
    actions: list[Markup] = []
    if not chrome.read_only:
        if job.status != "running":
            label = "Run now" if job.status == "new" else "Retry now"
            actions.append(_action(chrome, job_id, "retry", label))
        if job.status not in FINAL_STATUSES:
            actions.append(_action(chrome, job_id, "cancel", "Cancel"))
        actions.append(
            _action(chrome, job_id, "delete", "Delete", confirm=f"Delete job {job_id} for good?")
        )
    follow = (
        html(' data-job-url="{url}" data-refresh-ms="2000"', url=links.api_job(job_id))
        if job.status not in FINAL_STATUSES
        else Markup("")
    )
    created = "Died at" if job.status == "dead" else "Created at"
    error = (
        html(
            '<h2>Error</h2><pre data-job-field="error">{error}</pre>',
            error=_clip(job.error, _MAX_SHOWN),
        )
        if job.error
        else Markup("")
    )
    return chrome.page(
        f"Job {job_id}",
        html(
            "{notice}<section{follow}><h1>Job {id} {status}</h1>"
            '<div class="actions">{actions}</div>'
            '<dl><dt>Queue</dt><dd><a href="{queue_href}">{queue}</a></dd>'
            '<dt>Retries</dt><dd data-job-field="retries">{retries}</dd>'
            '<dt>Run after</dt><dd data-job-field="run_after">{run_after}</dd>'
            '<dt>Ran at</dt><dd data-job-field="ran_at">{ran_at}</dd>'
            '<dt>{created}</dt><dd data-job-field="created_at">{created_at}</dd>'
            '<dt>Deadline</dt><dd data-job-field="deadline">{deadline}</dd>'
            "<dt>Fingerprint</dt><dd>{fingerprint}</dd></dl>"
            "{error}<h2>Payload</h2><pre>{payload}</pre></section>",
            notice=_notice(notice),
            follow=follow,
            id=job_id,
            status=_badge(job.status, **{"data-job-status": "", "data-job-field": "status"}),
            actions=join(actions),
            queue_href=links.jobs(queue=job.queue),
            queue=job.queue,
            retries=cells["retries"],
            run_after=cells["run_after"],
            ran_at=cells["ran_at"],
            created=created,
            created_at=cells["created_at"],
            deadline=cells["deadline"],
            fingerprint=job.fingerprint or "—",
            error=error,
            payload=_payload_text(job),
        ),
    )


def _action(chrome: Chrome, job_id: str, action: str, label: str, *, confirm: str = "") -> Markup:
    return html(
        '<form method="post" action="{action}"{confirm}>'
        '<input type="hidden" name="csrf" value="{csrf}">'
        '<button type="submit" class="{css}">{label}</button></form>',
        action=chrome.links.job(job_id, action),
        confirm=html(' data-confirm="{text}"', text=confirm) if confirm else Markup(""),
        csrf=chrome.csrf,
        css="danger" if action in ("cancel", "delete") else "primary",
        label=label,
    )


# -- login and errors -------------------------------------------------------------------


def login_page(chrome: Chrome, *, next_path: str, failed: bool) -> Markup:
    message = (
        html('<div class="notice error" role="alert">That token is not right.</div>')
        if failed
        else Markup("")
    )
    return chrome.page(
        "Log in",
        html(
            "{message}<h1>This dashboard needs its token</h1>"
            "<p>Paste the dashboard's token (<code>--token</code> or "
            "<code>NEOQ_DASHBOARD_TOKEN</code>). Scripts send it as "
            "<code>Authorization: Bearer …</code> instead.</p>"
            '<form class="filters" method="post" action="{action}">'
            '<input type="hidden" name="next" value="{next}">'
            '<label>Token<input type="password" name="token" autocomplete="current-password" '
            "required autofocus></label>"
            '<button type="submit">Log in</button></form>',
            message=message,
            action=chrome.links.login(),
            next=next_path,
        ),
    )


def error_page(chrome: Chrome, title: str, message: str, *, back: str | None = None) -> Markup:
    link = html('<p><a href="{href}">Back</a></p>', href=back) if back else Markup("")
    return chrome.page(
        title,
        html(
            '<h1>{title}</h1><div class="notice error" role="alert">{message}</div>{link}',
            title=title,
            message=message,
            link=link,
        ),
    )
