"""What keeps the dashboard to its owner: the bind address, the token, the headers, the files it reads.

- It binds a loopback address unless the operator says ``--allow-remote`` (and is warned).
- Every page needs the token printed at start (as Jupyter does): the link carries
  it once, a cookie (HttpOnly, SameSite=Strict) afterwards. Actions are POSTs that
  carry it again in the form, from the same origin; anything else is refused.
- The cookie is named for the dashboard's port and holds a value derived from the
  token and that name (:func:`cookie_value`), never the token: browsers send the
  cookies of ``127.0.0.1`` to every port, and what another port receives opens no
  other dashboard, and is refused by this one under any other name.
- A request body is refused (413) before it is read when it is larger than the
  limit (:class:`BodyLimit`), and an action without its token before its body is read.
- On loopback, a request for another host name is refused (DNS rebinding).
- Every response carries a Content-Security-Policy that allows scripts and styles
  from the dashboard itself only: no inline script, nothing from elsewhere.
- A file is served only if, symlinks resolved, it is a regular file inside the home.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import BodyTooLarge, UsageError

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
#: A report file saved by ``loraq report``: its own inline style sheet, and no script at all.
CSP_SAVED_REPORT = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; frame-ancestors 'none'; sandbox"

HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    # No Referer to other sites (the first link carries the token); same-origin keeps the Origin header
    # on the dashboard's own POSTs, which "no-referrer" would turn into "null".
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",
}

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_host(host: str, allow_remote: bool) -> str | None:
    """Refuse a non-loopback ``host`` unless ``allow_remote``; return the warning to print if allowed."""
    if is_loopback(host):
        return None
    if not allow_remote:
        raise UsageError(f"--host {host}: not a loopback address; the dashboard can cancel and retry jobs, so "
                         "serving it on the network needs --allow-remote (anyone who can reach it and has the "
                         "token can act on the queue)")
    return (f"serving on {host}, beyond this machine: anyone who can reach it and has the token can cancel, "
            "retry and pause jobs; the connection is not encrypted (use an SSH tunnel, or a proxy with TLS)")


def same_token(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def cookie_value(token: str, name: str) -> str:
    """What the cookie called ``name`` holds: a keyed digest of the token and the name, not the token.

    A cookie set by the dashboard on another port has another name and another value;
    either way this one refuses it, and the link's token never travels in a cookie.
    """
    digest = hmac.new(token.encode(), b"loraq-serve cookie " + name.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def host_allowed(host_header: str | None, bound: str) -> bool:
    """On a loopback bind, only loopback host names (a rebound DNS name is someone else's page)."""
    if not is_loopback(bound):
        return True
    if not host_header:
        return False
    name = urlsplit(f"//{host_header}").hostname or ""
    return is_loopback(name)


def same_origin(headers: MutableMapping[str, str] | Any, scheme: str) -> bool:
    """A POST from a page of this dashboard: Origin (or Referer) names this host, or no browser sent it."""
    host = headers.get("host", "")
    expected = f"{scheme}://{host}"
    origin = headers.get("origin")
    if origin is not None:
        return origin == expected
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    referer = headers.get("referer")
    if referer is not None:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" == expected
    return True  # not a browser (curl, a script): the token alone decides


def local_path(next_url: str | None, default: str = "/") -> str:
    """A redirect target that stays on this dashboard (no scheme, no host, no ``//`` or backslash)."""
    if not next_url or not next_url.startswith("/") or next_url.startswith("//") or "\\" in next_url:
        return default
    parts = urlsplit(next_url)
    if parts.scheme or parts.netloc:
        return default
    return next_url


def open_inside(root: Path, path: Path) -> int:
    """A file descriptor for ``path``, if it is a regular file inside ``root`` once symlinks are resolved.

    The check is made on the descriptor that is read (``O_NOFOLLOW`` on the resolved
    path, then ``fstat``): a file swapped for a symlink or a FIFO afterwards is refused.
    """
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise PermissionError(f"{path}: outside {root}")
    fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PermissionError(f"{path}: not a regular file")
    return fd


ASGIReceive = Callable[[], Awaitable[Any]]
ASGISend = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class SecurityHeaders:
    """Pure ASGI middleware (streams pass through): the headers above on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in HEADERS.items() if k.encode() not in present]
                message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        await self.app(scope, receive, with_headers)


# ---------------------------------------------------------------- request bodies

#: The most bytes a request body may hold unless a path prefix says otherwise (``loraq serve
#: --max-body-bytes``). The dashboard's own actions are forms of a few fields.
MAX_BODY_BYTES = 1024 * 1024


def declared_length(scope: MutableMapping[str, Any]) -> int | None:
    """The body length the request announced (``Content-Length``), or ``None``: none, or chunked."""
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isascii() and text.isdigit() else None
    return None


def body_too_large(scope: MutableMapping[str, Any], limit: int) -> bool:
    """Whether the request announces a body over ``limit`` bytes: answer it before reading a byte."""
    length = declared_length(scope)
    return length is not None and length > limit


def has_body(scope: MutableMapping[str, Any]) -> bool:
    """Whether a request comes with a body (a length above zero, or chunked)."""
    for key, value in scope.get("headers", []):
        name = key.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


def closing(send: ASGISend) -> ASGISend:
    """``send`` with ``connection: close`` on the response: for an answer that leaves the body unread."""

    async def with_close(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = dict(message, headers=[*headers, (b"connection", b"close")])
        await send(message)

    return with_close


def too_large_text(limit: int) -> ASGIApp:
    """The default refusal: 413 in one line of text, and the connection closed (the rest is never read)."""
    from starlette.responses import PlainTextResponse

    refusal: ASGIApp = PlainTextResponse(f"request body too large: the limit is {limit} bytes", status_code=413,
                                         headers={"connection": "close"})
    return refusal


@dataclass(frozen=True)
class BodyRule:
    """Bodies of requests under ``prefix`` (a path prefix such as ``"/v1/"``): their limit, their refusal.

    ``refuse(limit)`` returns the ASGI app that answers (an API answers in its own error
    shape); it should say ``connection: close``, since the body is left unread.
    """

    prefix: str
    limit: int
    refuse: Callable[[int], ASGIApp] = too_large_text


class BodyLimit:
    """Pure ASGI middleware: a request body over its limit is refused with 413 before it is read.

    A ``Content-Length`` over the limit is answered at once. A body that announces no
    length (chunked) is counted as the app reads it; past the limit the app's reading
    ends with :class:`BodyTooLarge`, whatever it sent is dropped, and the refusal is sent
    instead. The longest matching ``rules`` prefix decides; the others get ``limit``.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES, rules: Iterable[BodyRule] = ()) -> None:
        self.app = app
        self.default = BodyRule("", limit)
        self.rules = sorted(rules, key=lambda rule: len(rule.prefix), reverse=True)

    def rule_for(self, path: str) -> BodyRule:
        return next((rule for rule in self.rules if path.startswith(rule.prefix)), self.default)

    async def __call__(self, scope: MutableMapping[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = self.rule_for(scope.get("path", ""))
        if body_too_large(scope, rule.limit):
            await rule.refuse(rule.limit)(scope, receive, send)
            return
        seen = 0
        over = False
        started = False

        async def counted() -> Any:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > rule.limit:
                    over = True
                    raise BodyTooLarge(rule.limit)
            return message

        async def guarded(message: Any) -> None:
            nonlocal started
            if over:  # the app's answer to a body it could not finish reading (a 500): ours instead
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except BodyTooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over and not started:
            await rule.refuse(rule.limit)(scope, receive, send)
