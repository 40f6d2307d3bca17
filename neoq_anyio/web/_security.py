"""Who may use the dashboard, and which requests it trusts.

* **Token.** With a token, every page, ``/api/*`` and ``/metrics`` need it:
  as ``Authorization: Bearer T`` (scripts, Prometheus), or from a browser
  through a session cookie. A browser cannot send a bearer header when it
  navigates, so it gets the cookie from the login form (``POST /login``) or
  once from ``?token=T`` on any page; the page then drops the token from
  the address bar. The cookie is ``HttpOnly`` and ``SameSite=Strict``
  (``Secure`` over HTTPS), and holds an HMAC of the token, not the token:
  changing the token logs every browser out.
* **CSRF.** Actions are POST only. A request authenticated by its bearer
  header cannot be forged by another site (browsers never add that header
  by themselves), so it needs nothing more. Any other POST must carry the
  form's CSRF token, equal to the ``SameSite=Strict`` cookie set with the
  page (double-submit: another site can neither read the cookie nor make
  the browser send it), and must not be marked cross-site by the browser
  (``Sec-Fetch-Site``). This holds without a token too, where no session
  cookie exists but a local dashboard is still a target.
* **Host.** Served on a loopback address without a token, the dashboard
  answers only requests for a loopback host name (``allowed_hosts``), so a
  page on another site cannot reach it through DNS rebinding (a name that
  resolves to 127.0.0.1 after the page loaded).
* Every response says ``nosniff``, no framing, no referrer to other
  origins and no caching; pages add a Content-Security-Policy whose nonce
  lets only their own script and style run.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Literal

from starlette.datastructures import MutableHeaders
from starlette.responses import PlainTextResponse

if TYPE_CHECKING:
    from collections.abc import Iterable

    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CSRF_COOKIE",
    "SESSION_COOKIE",
    "Credentials",
    "Guard",
    "page_policy",
]

SESSION_COOKIE = "neoq_dashboard_session"
CSRF_COOKIE = "neoq_dashboard_csrf"
_SESSION_CONTEXT = b"neoq_anyio dashboard session v1"
_CSRF_BYTES = 32
_SAFE_FETCH_SITES = frozenset({"same-origin", "none"})

Credentials = Literal["open", "header", "cookie", "query"]


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())


def page_policy(nonce: str) -> str:
    """The Content-Security-Policy of an HTML page whose script and style carry ``nonce``."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


class Guard:
    """The token check, the cookies, and the CSRF check."""

    def __init__(self, token: str | None) -> None:
        self._token = token
        self._session = (
            hmac.new(token.encode(), _SESSION_CONTEXT, hashlib.sha256).hexdigest()
            if token is not None
            else None
        )

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def check_token(self, given: str) -> bool:
        return self._token is not None and _same(given, self._token)

    def credentials(self, request: Request) -> Credentials | None:
        """How the request proved it knows the token; ``None`` if it did not."""
        if self._token is None or self._session is None:
            return "open"
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(value.strip(), self._token):
            return "header"
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie is not None and _same(cookie, self._session):
            return "cookie"
        query = request.query_params.get("token")
        if request.method in ("GET", "HEAD") and query is not None and _same(query, self._token):
            return "query"
        return None

    def start_session(self, request: Request, response: Response) -> None:
        assert self._session is not None
        _set_cookie(request, response, SESSION_COOKIE, self._session)

    def end_session(self, request: Request, response: Response) -> None:
        response.delete_cookie(
            SESSION_COOKIE, path=_cookie_path(request), httponly=True, samesite="strict"
        )

    def csrf_token(self, request: Request) -> str:
        """The browser's CSRF token, or a new one (``remember_csrf`` then sets it)."""
        existing = request.cookies.get(CSRF_COOKIE, "")
        if 32 <= len(existing) <= 64 and existing.isascii() and existing.isprintable():
            return existing
        return secrets.token_urlsafe(_CSRF_BYTES)

    def remember_csrf(self, request: Request, response: Response, token: str) -> None:
        if request.cookies.get(CSRF_COOKIE) != token:
            _set_cookie(request, response, CSRF_COOKIE, token)

    def forgery(
        self, request: Request, credentials: Credentials, form: dict[str, str]
    ) -> str | None:
        """Why a POST looks forged, or ``None`` when it is trusted."""
        if credentials == "header":
            return None
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in _SAFE_FETCH_SITES:
            return f"the browser says this request came from another site ({site})"
        cookie = request.cookies.get(CSRF_COOKIE)
        field = form.get("csrf")
        if not cookie or not field or not _same(field, cookie):
            return "the form's CSRF token is missing or stale: reload the page and try again"
        return None


def _cookie_path(request: Request) -> str:
    return str(request.scope.get("root_path") or "").rstrip("/") or "/"


def _set_cookie(request: Request, response: Response, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        path=_cookie_path(request),
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


class Shield:
    """ASGI middleware: the host check, and the headers every response carries."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None) -> None:
        self.app = app
        self.allowed_hosts = (
            frozenset(_bare_host(host) for host in allowed_hosts)
            if allowed_hosts is not None
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed_hosts is not None:
            host = _bare_host(_header(scope, b"host"))
            if host not in self.allowed_hosts:
                response = PlainTextResponse(
                    f"this dashboard does not answer for the host {host!r}: "
                    "start it with --allowed-host for that name\n",
                    status_code=400,
                )
                await response(scope, receive, self._with_headers(send))
                return
        await self.app(scope, receive, self._with_headers(send))

    @staticmethod
    def _with_headers(send: Send) -> Send:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "same-origin")
                headers.setdefault("Cache-Control", "no-store")
                headers.setdefault(
                    "Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"
                )
            await send(message)

        return send_with_headers


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


def _bare_host(host: str) -> str:
    """A Host header's name without its port, lowercased (``[::1]:8080`` gives ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host
