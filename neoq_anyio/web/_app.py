"""``create_app``: the dashboard as a Starlette application over a backend's public API.

Pages are drawn on the server (``_pages``) and refreshed by one small script
that polls two JSON endpoints; there is no front-end build. Routes, all
behind the token when there is one (``_security``):

* ``GET /``: queues with their counts and recent throughput, and the latest
  dead jobs; ``GET /api/stats`` is the same counts as JSON.
* ``GET /jobs?queue=&status=&before=&limit=``: jobs, newest first, paged by
  id; ``GET /jobs/ID``: one job; ``GET /api/jobs/ID`` as JSON.
* ``POST /jobs/ID/retry|cancel|delete``: the actions (403 when read-only).
* ``POST /queues/QUEUE/pause|resume``: pause or resume a queue (403 when
  read-only).
* ``GET /metrics``: Prometheus's text format (``_metrics``).
* ``GET|POST /login``, ``POST /logout``: the browser session, with a token.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from neoq_anyio._backend import Backend
from neoq_anyio._exceptions import ConfigurationError, DuplicateJobError, NeoqError, NoJobError

from . import _pages
from ._metrics import metrics_response
from ._pages import JOB_STATUSES, Chrome, Links
from ._security import Guard, Shield, page_policy
from ._throughput import Throughput

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from starlette.requests import Request

    from neoq_anyio._models import QueueStats

    from ._html import Markup
    from ._security import Credentials
    from ._throughput import Rate

    Endpoint = Callable[[Request, Credentials], Awaitable[Response]]

__all__ = ["create_app"]

log = logging.getLogger("neoq_anyio.web")

_PAGE_SIZE = 50
_MAX_PAGE_SIZE = 500
_MAX_FORM_BYTES = 16 * 1024
_DEAD_SHOWN = 10  # dead jobs on the queues page


def create_app(
    nq: Backend,
    *,
    read_only: bool = False,
    token: str | None = None,
    allowed_hosts: Iterable[str] | None = None,
) -> Starlette:
    """The dashboard of the backend ``nq``, as an ASGI application (Starlette).

    Serve it with any ASGI server on the loop ``nq`` runs on, while its
    ``open_backend`` block is open (``neoq-anyio dashboard`` does this with
    Hypercorn), or mount it in your own Starlette application; links follow
    the path it is mounted at.

    Args:
        nq: the backend to show, from ``open_backend``.
        read_only: show no retry, cancel, delete, pause or resume buttons,
            and refuse those actions with 403.
        token: when given, every page, ``/api/*`` and ``/metrics`` require it,
            as ``Authorization: Bearer TOKEN`` or through the session cookie
            a browser gets from the login form or ``?token=TOKEN``.
        allowed_hosts: answer only requests whose ``Host`` is one of these
            names (ports ignored), 400 otherwise; ``None`` answers any. A
            dashboard on a loopback address without a token should allow
            loopback names only, so no web page can reach it through DNS
            rebinding (the command line does this).

    Raises:
        ConfigurationError: ``nq`` is not a backend, the token is empty or
            not a str, or ``allowed_hosts`` is a str or holds a non-str.
    """
    if not isinstance(nq, Backend):
        raise ConfigurationError(
            f"create_app needs the backend open_backend yields, got {type(nq).__name__}"
        )
    if token is not None and (not isinstance(token, str) or not token):
        raise ConfigurationError("the dashboard token must be a non-empty str, or None")
    hosts: list[str] | None = None
    if allowed_hosts is not None:
        if isinstance(allowed_hosts, str):
            raise ConfigurationError("allowed_hosts must be a list of host names, not one str")
        hosts = list(allowed_hosts)
        if not all(isinstance(host, str) and host for host in hosts):
            raise ConfigurationError("allowed_hosts must hold non-empty host names (str)")
    dashboard = _Dashboard(nq, read_only=bool(read_only), guard=Guard(token))
    return Starlette(
        routes=dashboard.routes(), middleware=[Middleware(Shield, allowed_hosts=hosts)]
    )


def _root(request: Request) -> str:
    return str(request.scope.get("root_path") or "").rstrip("/")


def _app_path(request: Request) -> str:
    """The request's path and query inside the app, without a ``token`` parameter."""
    root, path = _root(request), request.url.path
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
    return path + ("?" + urlencode(query) if query else "")


def _safe_next(value: str | None) -> str:
    """A path inside the app to go to after logging in; ``/`` for anything else."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    return value


async def _read_form(request: Request) -> dict[str, str] | None:
    """A small url-encoded form (``None`` when too large); parsed here, so the
    dashboard needs no multipart library."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return None
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


class _Dashboard:
    def __init__(self, nq: Backend, *, read_only: bool, guard: Guard) -> None:
        self.nq = nq
        self.read_only = read_only
        self.guard = guard
        self.throughput = Throughput()

    def routes(self) -> list[Route]:
        protect = self._protect
        return [
            Route("/", protect(self.overview)),
            Route("/jobs", protect(self.jobs)),
            Route("/jobs/{job_id}", protect(self.job)),
            *(
                Route(f"/jobs/{{job_id}}/{action}", protect(self._action(action)), methods=["POST"])
                for action in ("retry", "cancel", "delete")
            ),
            *(
                Route(
                    f"/queues/{{queue:path}}/{action}",
                    protect(self._queue_action(action)),
                    methods=["POST"],
                )
                for action in ("pause", "resume")
            ),
            Route("/api/stats", protect(self.api_stats)),
            Route("/api/jobs/{job_id}", protect(self.api_job)),
            Route("/metrics", protect(self.metrics)),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", protect(self.logout), methods=["POST"]),
        ]

    # -- plumbing ------------------------------------------------------------------------

    def _protect(self, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        async def protected(request: Request) -> Response:
            credentials = self.guard.credentials(request)
            if credentials is None:
                return self._unauthorized(request)
            try:
                response = await endpoint(request, credentials)
            except NeoqError as exc:
                response = self._failure(request, credentials, exc)
            if credentials == "query":
                self.guard.start_session(request, response)
            return response

        return protected

    def _unauthorized(self, request: Request) -> Response:
        headers = {"WWW-Authenticate": 'Bearer realm="neoq_anyio dashboard"'}
        path = _app_path(request)
        if path.startswith(("/api/", "/metrics")):
            return JSONResponse({"error": "this dashboard needs its token"}, 401, headers)
        failed = "token" in request.query_params or "authorization" in request.headers
        return self._page(
            request,
            None,
            lambda chrome: _pages.login_page(chrome, next_path=path, failed=failed),
            status=401,
            headers=headers,
        )

    def _failure(self, request: Request, credentials: Credentials, exc: NeoqError) -> Response:
        # DatabaseError messages never hold the password; bad input is the caller's.
        status = 400 if isinstance(exc, ValueError) else 503
        message = f"{type(exc).__name__}: {exc}"
        if status == 503:
            log.warning("dashboard: %s", message)
        if _app_path(request).startswith(("/api/", "/metrics")):
            return JSONResponse({"error": message}, status)
        title = "Bad request" if status == 400 else "The backend cannot answer"
        return self._page(
            request,
            credentials,
            lambda chrome: _pages.error_page(chrome, title, message),
            status=status,
        )

    def _page(
        self,
        request: Request,
        credentials: Credentials | None,
        render: Callable[[Chrome], Markup],
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> Response:
        nonce = secrets.token_urlsafe(16)
        csrf = self.guard.csrf_token(request)
        chrome = Chrome(
            Links(_root(request)),
            nonce=nonce,
            read_only=self.read_only,
            csrf=csrf,
            logout=self.guard.has_token and credentials in ("cookie", "query"),
        )
        response = HTMLResponse(
            render(chrome),
            status_code=status,
            headers={**(headers or {}), "Content-Security-Policy": page_policy(nonce)},
        )
        self.guard.remember_csrf(request, response, csrf)
        return response

    def _error(
        self,
        request: Request,
        credentials: Credentials,
        status: int,
        title: str,
        message: str,
        *,
        back: str | None = None,
    ) -> Response:
        return self._page(
            request,
            credentials,
            lambda chrome: _pages.error_page(chrome, title, message, back=back),
            status=status,
        )

    async def _stats(self) -> tuple[list[QueueStats], dict[str, Rate | None]]:
        stats = await self.nq.queue_stats()
        return stats, self.throughput.record(anyio.current_time(), stats)

    # -- pages -----------------------------------------------------------------------------

    async def overview(self, request: Request, credentials: Credentials) -> Response:
        stats, rates = await self._stats()
        dead = await self.nq.list_jobs(status="dead", limit=_DEAD_SHOWN)
        now = datetime.now(UTC)
        return self._page(
            request,
            credentials,
            lambda chrome: _pages.overview_page(chrome, stats, rates, dead, now),
        )

    async def jobs(self, request: Request, credentials: Credentials) -> Response:
        params = request.query_params
        queue = params.get("queue") or None
        status = params.get("status") or None
        before = params.get("before") or None
        if status is not None and status not in JOB_STATUSES:
            return self._error(
                request,
                credentials,
                400,
                "Bad request",
                f"status must be one of {', '.join(JOB_STATUSES)}, got {status!r}",
            )
        try:
            limit = int(params.get("limit") or _PAGE_SIZE)
        except ValueError:
            limit = 0
        if not 1 <= limit <= _MAX_PAGE_SIZE:
            return self._error(
                request,
                credentials,
                400,
                "Bad request",
                f"limit must be a whole number from 1 to {_MAX_PAGE_SIZE}",
            )
        found = await self.nq.list_jobs(
            queue=queue,
            status=status,  # type: ignore[arg-type] # checked against JOB_STATUSES above
            limit=limit + 1,
            before_id=before,
        )
        page, more = found[:limit], len(found) > limit
        older = page[-1].id if more and page else None
        queues = [stat.queue for stat in await self.nq.queue_stats()]
        now = datetime.now(UTC)
        return self._page(
            request,
            credentials,
            lambda chrome: _pages.jobs_page(
                chrome,
                page,
                queue=queue,
                status=status,
                queues=queues,
                before=before,
                older=older,
                limit=str(limit) if limit != _PAGE_SIZE else None,
                notice=params.get("done"),
                now=now,
            ),
        )

    async def job(self, request: Request, credentials: Credentials) -> Response:
        job_id = request.path_params["job_id"]
        job = await self.nq.get_job(job_id)
        if job is None:
            return self._error(
                request,
                credentials,
                404,
                "No such job",
                f"There is no job {job_id}: it was deleted, pruned, or never existed.",
                back=Links(_root(request)).jobs(),
            )
        now = datetime.now(UTC)
        notice = request.query_params.get("done")
        return self._page(
            request,
            credentials,
            lambda chrome: _pages.job_page(chrome, job, notice=notice, now=now),
        )

    # -- actions ---------------------------------------------------------------------------

    def _action(self, action: str) -> Endpoint:
        async def act(request: Request, credentials: Credentials) -> Response:
            return await self._act(request, credentials, action, request.path_params["job_id"])

        return self._guarded(act)

    def _queue_action(self, action: str) -> Endpoint:
        async def act(request: Request, credentials: Credentials) -> Response:
            queue = request.path_params["queue"]
            if action == "pause":
                await self.nq.pause_queue(queue)
            else:
                await self.nq.resume_queue(queue)
            return RedirectResponse(Links(_root(request)).home(), status_code=303)

        return self._guarded(act)

    def _guarded(self, perform: Endpoint) -> Endpoint:
        """``perform`` as a form's POST: refused when read-only, too large or forged."""

        async def act(request: Request, credentials: Credentials) -> Response:
            if self.read_only:
                return self._error(
                    request,
                    credentials,
                    403,
                    "Read-only",
                    "This dashboard is read-only: it changes no job and no queue.",
                )
            form = await _read_form(request)
            if form is None:
                return self._error(request, credentials, 413, "Too large", "The form is too large.")
            forged = self.guard.forgery(request, credentials, form)
            if forged is not None:
                return self._error(request, credentials, 403, "Refused", forged)
            return await perform(request, credentials)

        return act

    async def _act(
        self, request: Request, credentials: Credentials, action: str, job_id: str
    ) -> Response:
        links = Links(_root(request))
        back = links.job(job_id)
        if action == "retry":
            try:
                await self.nq.retry_job(job_id)
            except NoJobError:
                return self._error(
                    request, credentials, 404, "No such job", f"There is no job {job_id}."
                )
            except DuplicateJobError as exc:
                return self._error(request, credentials, 409, "Cannot retry", str(exc), back=back)
            return RedirectResponse(f"{back}?done=retry", status_code=303)
        if action == "cancel":
            if not await self.nq.cancel_job(job_id):
                return self._error(
                    request,
                    credentials,
                    409,
                    "Cannot cancel",
                    f"Job {job_id} cannot be cancelled: it is unknown, already processed or "
                    "dead, or being run now in transaction mode.",
                    back=back,
                )
            return RedirectResponse(f"{back}?done=cancel", status_code=303)
        if not await self.nq.delete_job(job_id):
            return self._error(
                request,
                credentials,
                409,
                "Cannot delete",
                f"Job {job_id} cannot be deleted: it is unknown, or being run now.",
                back=back,
            )
        return RedirectResponse(f"{links.jobs()}?done=delete", status_code=303)

    # -- JSON, metrics, session ----------------------------------------------------------------

    async def api_stats(self, request: Request, credentials: Credentials) -> Response:
        stats, rates = await self._stats()
        return JSONResponse(
            {"queues": [_pages.queue_document(stat, rates.get(stat.queue)) for stat in stats]}
        )

    async def api_job(self, request: Request, credentials: Credentials) -> Response:
        job_id = request.path_params["job_id"]
        job = await self.nq.get_job(job_id)
        if job is None:
            return JSONResponse({"error": f"no job {job_id}"}, 404)
        return JSONResponse(_pages.job_document(job, datetime.now(UTC)))

    async def metrics(self, request: Request, credentials: Credentials) -> Response:
        return metrics_response()

    async def login(self, request: Request) -> Response:
        if not self.guard.has_token:
            return RedirectResponse(Links(_root(request)).home(), status_code=303)
        if request.method == "GET":
            next_path = _safe_next(request.query_params.get("next"))
            return self._page(
                request,
                None,
                lambda chrome: _pages.login_page(chrome, next_path=next_path, failed=False),
            )
        form = await _read_form(request) or {}
        site = request.headers.get("sec-fetch-site")
        if site not in (None, "same-origin", "none") or not self.guard.check_token(
            form.get("token", "")
        ):
            next_path = _safe_next(form.get("next"))
            return self._page(
                request,
                None,
                lambda chrome: _pages.login_page(chrome, next_path=next_path, failed=True),
                status=401,
            )
        response = RedirectResponse(_root(request) + _safe_next(form.get("next")), status_code=303)
        self.guard.start_session(request, response)
        return response

    async def logout(self, request: Request, credentials: Credentials) -> Response:
        form = await _read_form(request) or {}
        forged = self.guard.forgery(request, credentials, form)
        if forged is not None:
            return self._error(request, credentials, 403, "Refused", forged)
        response = RedirectResponse(Links(_root(request)).login(), status_code=303)
        self.guard.end_session(request, response)
        return response
