"""HTML with escaping by construction: the dashboard's only way to build markup.

Every page is built from ``html(template, **values)``: the template is a
literal written here, and every value is escaped (``& < > " '``) unless it is
already ``Markup`` built the same way. Attribute values are always
double-quoted in the templates, so an escaped value cannot leave its
attribute. No value ever goes into a script: the page scripts are constants,
read what they need from ``data-`` attributes, and write with
``textContent``; a Content-Security-Policy with a per-response nonce keeps
any other script from running, should an escape ever be missed.
"""

from __future__ import annotations

import html as _stdlib_html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["CSS", "SCRIPT", "Markup", "escape", "html", "join"]


class Markup(str):
    """Text that is already safe HTML: built by ``html()`` or ``escape()`` only."""

    __slots__ = ()


def escape(value: object) -> Markup:
    """``value`` as HTML text; ``Markup`` passes unchanged."""
    if isinstance(value, Markup):
        return value
    return Markup(_stdlib_html.escape(str(value), quote=True))


def html(template: str, /, **values: object) -> Markup:
    """``template`` (a literal with ``{name}`` fields) with every value escaped."""
    return Markup(template.format_map({name: escape(value) for name, value in values.items()}))


def join(parts: Iterable[Markup], separator: str = "") -> Markup:
    """Pieces of markup, one after the other."""
    return Markup(separator.join(escape(part) for part in parts))


CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --link: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", sans-serif; }
a { color: var(--link); text-decoration: none; }
a:hover { text-decoration: underline; }
header { display: flex; align-items: center; gap: 1.5rem; padding: .65rem 1.5rem;
  background: #1f2328; color: #fff; }
header a { color: #e6edf3; }
header .brand { font-weight: 650; color: #fff; letter-spacing: .01em; }
header .right { margin-left: auto; display: flex; gap: 1rem; align-items: center; }
header form { margin: 0; }
header button { background: none; border: 0; color: #e6edf3; cursor: pointer; font: inherit; }
.tag { border: 1px solid #8c959f; border-radius: 1rem; padding: 0 .55rem; font-size: 12px; }
main { padding: 1.1rem 1.5rem 2rem; max-width: 1280px; }
h1 { font-size: 1.35rem; margin: .2rem 0 1rem; font-weight: 600; }
h2 { font-size: 1.05rem; margin: 1.8rem 0 .6rem; font-weight: 600; }
.sub { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: .42rem .65rem; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
th { background: var(--soft); color: var(--muted); font-size: 12px; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num a { color: inherit; }
td.num.zero, td.num.zero a { color: #afb8c1; }
td.wrap { overflow-wrap: anywhere; max-width: 28rem; }
tr:hover td { background: #fafbfc; }
.badge { display: inline-block; padding: .05rem .55rem; border-radius: 1rem; font-size: 12px;
  font-weight: 600; line-height: 1.5; }
.s-new { background: #ddf4ff; color: #0550ae; }
.s-running { background: #fff1c2; color: #7d4e00; }
.s-failed { background: #ffe2d6; color: #a1330a; }
.s-processed { background: #d2f4dc; color: #116329; }
.s-dead { background: #ffdde1; color: #a0111f; }
.s-paused { background: #eaeef2; color: #424a53; }
td.num.c-dead:not(.zero) a { color: #a0111f; font-weight: 600; }
td.num.c-failed:not(.zero) a { color: #a1330a; font-weight: 600; }
form.filters { display: flex; gap: .8rem; align-items: end; margin-bottom: 1rem; flex-wrap: wrap; }
form.filters label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
input, select, button { font: inherit; padding: .3rem .5rem; border: 1px solid var(--line);
  border-radius: 6px; background: #fff; color: var(--fg); }
button { cursor: pointer; background: var(--soft); font-weight: 500; }
button:hover { background: #eef1f4; }
button.primary { background: #1f883d; border-color: #1a7f37; color: #fff; }
button.primary:hover { background: #1a7f37; }
button.danger { color: #a0111f; }
time { white-space: nowrap; }
.actions { display: flex; gap: .6rem; margin: 1rem 0; }
.actions form { margin: 0; }
form.inline { display: inline; margin: 0; }
form.inline button { padding: .05rem .4rem; font-size: 12px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .35rem 1.5rem; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px;
  padding: .75rem 1rem; overflow: auto; max-height: 32rem; white-space: pre-wrap;
  overflow-wrap: anywhere; font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, monospace; }
.notice { padding: .6rem 1rem; border-radius: 6px; margin-bottom: 1rem; background: #ddf4ff;
  border: 1px solid #b6e3ff; }
.notice.error { background: #ffebe9; border-color: #ffc1c0; }
.pager { display: flex; gap: 1.2rem; margin-top: .9rem; }
.empty { color: var(--muted); padding: 1rem 0; }
"""

# The pages' one script, identical on every page: it reads URLs from data-
# attributes and writes only with textContent, so no value ever becomes code.
SCRIPT = """
"use strict";
(() => {
  const STATUSES = ["new", "running", "failed", "processed", "dead"];
  const stamp = document.getElementById("refreshed");
  const say = (text) => { if (stamp) stamp.textContent = text; };

  // The queues table: counts refreshed from the JSON endpoint every few seconds.
  const queues = document.querySelector("[data-stats-url]");
  if (queues) {
    const refresh = async () => {
      try {
        const response = await fetch(queues.dataset.statsUrl, { cache: "no-store" });
        if (!response.ok) throw new Error("HTTP " + response.status);
        const data = await response.json();
        const rows = new Map();
        for (const row of queues.querySelectorAll("tr[data-queue]")) {
          rows.set(row.dataset.queue, row);
        }
        const names = data.queues.map((q) => q.queue);
        if (
          names.length !== rows.size ||
          names.some((name) => !rows.has(name)) ||
          data.queues.some((q) => String(q.paused) !== rows.get(q.queue).dataset.paused)
        ) {
          // A queue came, went, was paused or resumed: the server draws the new table.
          window.location.reload();
          return;
        }
        for (const q of data.queues) {
          for (const cell of rows.get(q.queue).querySelectorAll("[data-field]")) {
            const field = cell.dataset.field;
            (cell.querySelector("a") || cell).textContent = q.cells[field];
            if (cell.classList.contains("num")) cell.classList.toggle("zero", q[field] === 0);
          }
        }
        say("updated " + new Date().toLocaleTimeString());
      } catch (error) {
        say("refresh failed (" + error.message + "), retrying");
      }
    };
    setInterval(refresh, Number(queues.dataset.refreshMs) || 5000);
  }

  // A job's page: its state followed until it is processed, dead or deleted.
  const job = document.querySelector("[data-job-url]");
  if (job) {
    const follow = async () => {
      try {
        const response = await fetch(job.dataset.jobUrl, { cache: "no-store" });
        if (response.status === 404) { say("this job no longer exists"); return; }
        if (!response.ok) throw new Error("HTTP " + response.status);
        const data = await response.json();
        for (const cell of job.querySelectorAll("[data-job-field]")) {
          cell.textContent = data.cells[cell.dataset.jobField];
        }
        const badge = job.querySelector("[data-job-status]");
        if (badge && STATUSES.includes(data.status)) badge.className = "badge s-" + data.status;
        say("updated " + new Date().toLocaleTimeString());
        if (data.status === "processed" || data.status === "dead") return;
      } catch (error) {
        say("refresh failed (" + error.message + "), retrying");
      }
      setTimeout(follow, Number(job.dataset.refreshMs) || 2000);
    };
    setTimeout(follow, Number(job.dataset.refreshMs) || 2000);
  }

  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }

  // Opened with ?token=: the cookie is set, so drop the token from the address bar.
  const url = new URL(window.location.href);
  if (url.searchParams.has("token")) {
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
})();
"""
