"""The dashboard's ASGI app: pages, live streams and actions over :mod:`loraq.api`.

    GET  /                       the queue: ?status=, ?group= (a sweep), ?page=
    GET  /stream                 its live updates (server-sent events)
    GET  /jobs/<id>              one job: curves, outputs, inspection, attempts, events, log
    GET  /jobs/<id>/stream       its live updates, the log following
    GET  /jobs/<id>/log          the whole training log (?attempt=N), as text
    GET  /report                 the queue report;  /reports/<file>: those ``loraq report`` saved
    /v1/...                      the OpenAI-style fine-tuning API (bearer keys): :mod:`loraq.service`
    POST /jobs/<id>/cancel|retry, /queue/pause|resume      actions (token, same origin)

Reads go through read-only connections (SQLite ``mode=ro``); the database is never
created here. Actions call the same api functions as the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import api, report
from ..errors import LoraqError, NotFoundError
from ..queue.records import STATES
from ..service.app import create_service
from ..workspace import Home
from . import security
from .feed import Change, Feed
from .render import LOG_TAIL, STATIC, JobView, Renderer

PAGE_SIZE = 100
#: Seconds between two looks at a followed log; between keep-alive comments on a quiet stream.
LOG_POLL_S = 1.0
KEEPALIVE_S = 15.0
#: The most a stream catches up by itself; a page further behind reloads.
CATCH_UP = 500
SAVED_REPORT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
SAVED_TYPES = {".json": "application/json", ".md": "text/plain; charset=utf-8", ".html": "text/html; charset=utf-8",
               ".txt": "text/plain; charset=utf-8"}


@dataclass(frozen=True)
class Settings:
    home: Home
    token: str
    host: str = "127.0.0.1"  # the address bound: on loopback, other Host names are refused
    poll_s: float = 0.5
    cookie: str = "loraq-token"


class Dashboard:
    """The ASGI app, and the change feed its pages follow (the server ends their streams when it stops)."""

    def __init__(self, app: Any, feed: Feed) -> None:
        self.app = app
        self.feed = feed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def create_app(settings: Settings) -> Dashboard:
    """The dashboard for ``settings.home``; its change feed runs while the app does (lifespan)."""
    home = settings.home
    renderer = Renderer(settings.token, home.root)
    feed = Feed(home, poll_s=settings.poll_s,
                prepare=lambda change: renderer.queue_update(change.seq, change.rows, change.counts, change.groups,
                                                             change.queue))

    def page(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(renderer.page(name, feed_error=feed.error, **context), status_code=status_code)

    def message(title: str, text: str, status_code: int, back: str | None = None) -> HTMLResponse:
        return page("message.html", status_code, title=title, message=text, back=back)

    # ---------------------------------------------------------------- pages

    def queue_page(request: Request) -> Response:
        status = request.query_params.get("status") or None
        group = request.query_params.get("group")
        if status is not None and status not in STATES:
            return message("no such status", f"{status!r} is not one of {', '.join(STATES)}", 404, "/")
        number = max(1, _int(request.query_params.get("page"), 1))
        try:
            q = api.queue_page(home, status=status, group=group, offset=(number - 1) * PAGE_SIZE, limit=PAGE_SIZE)
        except LoraqError as exc:  # damaged, or being created: say so, and the page can be reloaded
            return message("cannot read the queue", str(exc), 503)
        pages = max(1, -(-q.total // PAGE_SIZE))

        def link(n: int) -> str:
            query = {k: v for k, v in (("status", status), ("group", group), ("page", str(n))) if v is not None}
            return "/?" + urlencode(query)

        newest = max((job.id for job in q.jobs), default=0)
        return page("queue.html", page=q, status=status, group=group, exists=home.db_path.exists(),
                    first=q.offset + 1 if q.jobs else 0, last=q.offset + len(q.jobs),
                    prev_url=link(number - 1) if number > 1 else None,
                    next_url=link(number + 1) if number < pages else None,
                    newest=newest, room=PAGE_SIZE - len(q.jobs) if number >= pages else 0)

    def job_page(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        try:
            shown = api.show(home, str(job_id))
        except NotFoundError as exc:
            return message("no such job", str(exc), 404, "/")
        except LoraqError as exc:
            return message("cannot read the job", str(exc), 503, "/")
        if shown.job.id != job_id:  # a job *named* like this id: link to it by its own id
            return RedirectResponse(f"/jobs/{shown.job.id}", status_code=303)
        text, offset, skipped = _log_tail(home, shown.log_path)
        return page("job.html", view=JobView.of(shown), log_text=text, log_offset=offset, log_skipped=skipped)

    def job_log(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        attempt = request.query_params.get("attempt")
        try:
            path = api.log_path(home, str(job_id), _int(attempt, 0) if attempt is not None else None)
            fd = security.open_inside(home.root, path)
        except LoraqError as exc:
            return PlainTextResponse(str(exc), status_code=404 if isinstance(exc, NotFoundError) else 503)
        except OSError:  # outside the home, not a regular file, or gone
            return PlainTextResponse("no such log", status_code=404)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
        return PlainTextResponse(data.decode("utf-8", errors="replace"))

    def report_page(request: Request) -> Response:
        if not home.db_path.exists():
            return message("no report yet", "No jobs in this home yet.", 200)
        try:
            with api.open_reader(home) as store, store.snapshot():
                built = report.build(store, home)
        except LoraqError as exc:
            return message("cannot read the queue", str(exc), 503)
        saved = sorted(p.name for p in home.reports_dir.glob("*") if SAVED_REPORT.match(p.name) and p.is_file()) \
            if home.reports_dir.is_dir() else []
        from markupsafe import Markup

        return page("report.html", body=Markup(report.body_html(built)), saved=saved)

    def report_css(request: Request) -> Response:
        return Response(report.REPORT_CSS, media_type="text/css")

    def saved_report(request: Request) -> Response:
        name = request.path_params["name"]
        kind = SAVED_TYPES.get(Path(name).suffix)
        if not SAVED_REPORT.match(name) or kind is None:
            return PlainTextResponse("no such report", status_code=404)
        try:
            fd = security.open_inside(home.reports_dir, home.reports_dir / name)
        except OSError:
            return PlainTextResponse("no such report", status_code=404)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
        headers = {"content-security-policy": security.CSP_SAVED_REPORT}
        return Response(data, media_type=kind, headers=headers)

    # ---------------------------------------------------------------- streams

    async def queue_stream(request: Request) -> Response:
        since = _int(request.headers.get("last-event-id") or request.query_params.get("since"), 0)
        subscription = feed.subscribe()

        async def events() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                try:
                    behind = await run_in_threadpool(_changed_since, home, since)
                except LoraqError:  # unreadable this instant: end, and the browser reconnects in 2 s
                    return
                if behind is None:
                    yield _event("reload", {})
                    return
                if behind:
                    seq, counts, groups, queue = feed.totals()
                    payload = renderer.queue_update(max(seq, max(r["seq"] for r in behind)), behind, counts, groups, queue)
                    yield _event("queue", payload, payload["seq"])
                while True:
                    change = await _next(subscription)
                    if change is _QUIET:
                        yield ": keep-alive\n\n"
                        continue
                    if change is None:  # the feed stopped, or this page fell behind: it reconnects
                        return
                    assert isinstance(change, Change)
                    yield _event("queue", change.payload, change.seq)
            finally:
                feed.unsubscribe(subscription)

        return _sse(events())

    async def job_stream(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        last_id = request.headers.get("last-event-id", "")
        seq_text, _, log_text = last_id.partition(".") if last_id else ("", "", "")
        since = _int(seq_text or request.query_params.get("since"), 0)
        log_offset = _int(log_text or request.query_params.get("log"), 0)
        subscription = feed.subscribe()

        async def events() -> AsyncIterator[str]:
            nonlocal since, log_offset
            log_path: Path | None = None
            changed, quiet = True, 0.0
            try:
                yield "retry: 2000\n\n"
                while True:
                    if changed:  # this job changed (or the page just opened): read it again
                        shown = await run_in_threadpool(_show, home, job_id)
                        if shown is None:
                            return
                        if shown.job.seq > since:
                            since = shown.job.seq
                            quiet = 0.0
                            yield _event("job", {"sections": renderer.job_sections(JobView.of(shown))},
                                         f"{since}.{log_offset}")
                        newest = Path(shown.log_path) if shown.log_path else None
                        if newest != log_path and log_path is not None:
                            log_offset = 0  # a new attempt: follow its log from the start
                            yield _event("log", {"text": "", "reset": True}, f"{since}.{log_offset}")
                        log_path = newest
                    if log_path is not None:
                        text, log_offset = await run_in_threadpool(_log_from, home, log_path, log_offset)
                        if text:
                            quiet = 0.0
                            yield _event("log", {"text": text}, f"{since}.{log_offset}")
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield ": keep-alive\n\n"
                    change = await _next(subscription, timeout=LOG_POLL_S)
                    if change is None:
                        return
                    # Another job's change costs this job's page nothing more than this check.
                    changed = isinstance(change, Change) and any(row["id"] == job_id for row in change.rows)
                    quiet += LOG_POLL_S if change is _QUIET else 0.0
            finally:
                feed.unsubscribe(subscription)

        return _sse(events())

    # ---------------------------------------------------------------- actions

    async def act(request: Request) -> Response:
        form = await _form(request)
        given = form.get("token") or request.headers.get("x-loraq-token")
        if not security.same_token(given if isinstance(given, str) else None, settings.token):
            return message("refused", "This action needs the dashboard's token (from the link loraq serve printed).", 403)
        if not security.same_origin(request.headers, request.url.scheme):
            return message("refused", "This action came from another site's page.", 403)
        verb = request.path_params["verb"]
        job_id = request.path_params.get("job_id")
        next_field = form.get("next")
        back = security.local_path(next_field if isinstance(next_field, str) else None,
                                   f"/jobs/{job_id}" if job_id is not None else "/")
        if not home.db_path.exists():
            return message("nothing to act on", "No jobs in this home yet.", 404, back)
        try:
            if verb == "cancel":
                result = await run_in_threadpool(api.cancel, home, [str(job_id)])
            elif verb == "retry":
                result = await run_in_threadpool(api.retry, home, [str(job_id)])
            elif verb == "pause":
                await run_in_threadpool(api.pause, home, "paused from the dashboard")
                result = None
            else:
                await run_in_threadpool(api.resume, home)
                result = None
        except LoraqError as exc:
            return message(f"could not {verb}", str(exc), 409, back)
        if result is not None and result.refused:
            return message(f"could not {verb}", "; ".join(result.refused), 409, back)
        return RedirectResponse(back, status_code=303)

    # ---------------------------------------------------------------- the gate

    app = Starlette(
        routes=[
            Route("/", queue_page),
            Route("/stream", queue_stream),
            Route("/jobs/{job_id:int}", job_page),
            Route("/jobs/{job_id:int}/stream", job_stream),
            Route("/jobs/{job_id:int}/log", job_log),
            Route("/jobs/{job_id:int}/{verb:str}", act, methods=["POST"]),
            Route("/queue/{verb:str}", act, methods=["POST"]),
            Route("/report", report_page),
            Route("/report.css", report_css),
            Route("/reports/{name:str}", saved_report),
            Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        ],
        lifespan=_lifespan(feed),
    )

    verbs = {("jobs", "cancel"), ("jobs", "retry"), ("queue", "pause"), ("queue", "resume")}
    v1 = create_service(home, settings.token)

    async def gate(scope: Any, receive: Any, send: Any) -> None:
        """Host check, token check, and the POST-only verbs, before any route runs."""
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request = Request(scope, receive)
        if not security.host_allowed(request.headers.get("host"), settings.host):
            await PlainTextResponse("unknown host", status_code=403)(scope, receive, send)
            return
        path = request.url.path
        if path == "/v1" or path.startswith("/v1/"):  # its own keys (or the token as a bearer), its own errors
            await v1(scope, receive, send)
            return
        parts = path.strip("/").split("/")
        if request.method == "POST" and not ((parts[0], parts[-1]) in verbs and len(parts) in (2, 3)):
            await PlainTextResponse("no such action", status_code=404)(scope, receive, send)
            return
        if path.startswith("/static/") or path == "/report.css":
            await app(scope, receive, send)
            return
        given = request.query_params.get("token")
        if given is not None and request.method == "GET" and security.same_token(given, settings.token):
            # The link's token becomes a cookie, and leaves the address bar (and the history).
            query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = path + ("?" + urlencode(query) if query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(settings.cookie, settings.token, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            await response(scope, receive, send)
            return
        if not security.same_token(request.cookies.get(settings.cookie), settings.token) and request.method != "POST":
            await HTMLResponse(renderer.page(
                "message.html", title="the dashboard needs its token",
                message="Open the link that 'loraq serve' printed when it started (it ends in ?token=…).",
                back=None), status_code=403)(scope, receive, send)
            return
        await app(scope, receive, send)

    return Dashboard(security.SecurityHeaders(gate), feed)


def _lifespan(feed: Feed) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        feed.start()
        try:
            yield
        finally:
            await run_in_threadpool(feed.stop)

    return lifespan


_QUIET = object()


async def _next(subscription: asyncio.Queue[Change | None], timeout: float = KEEPALIVE_S) -> Any:
    try:
        return await asyncio.wait_for(subscription.get(), timeout)
    except asyncio.TimeoutError:
        return _QUIET


def _event(kind: str, data: Any, event_id: Any = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


async def _form(request: Request) -> dict[str, str]:
    """An action's urlencoded form (a few fields: no multipart parser needed)."""
    from urllib.parse import parse_qs

    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    body = await request.body()
    if len(body) > 16 * 1024:
        return {}
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", errors="replace")).items()}


def _int(text: str | None, default: int) -> int:
    try:
        return max(0, int(text)) if text is not None else default
    except ValueError:
        return default


def _changed_since(home: Home, since: int) -> list[dict[str, Any]] | None:
    """The rows a page that showed ``since`` has not seen; ``None`` if too many (it reloads)."""
    if not home.db_path.exists():
        return []
    with api.open_reader(home) as store:
        rows = store.changed_since(since, limit=CATCH_UP + 1)
    return None if len(rows) > CATCH_UP else rows


def _show(home: Home, job_id: int) -> api.ShowResult | None:
    try:
        return api.show(home, str(job_id))
    except LoraqError:  # gone, or unreadable now: the page's stream ends, and reconnects
        return None


def _log_from(home: Home, path: Path, offset: int) -> tuple[str, int]:
    """What ``path`` holds past ``offset`` (at most a page's tail of it), and the new offset."""
    try:
        fd = security.open_inside(home.root, path)
    except OSError:
        return "", offset
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < offset:  # rewritten: start again
            offset = 0
        start = max(offset, size - LOG_TAIL)
        fh.seek(start)
        data = fh.read(size - start)
    # Up to the last full line: a line cut in two (or a UTF-8 character) arrives whole next time.
    cut = data.rfind(b"\n") + 1
    data = data[:cut]
    return data.decode("utf-8", errors="replace"), start + len(data)


def _log_tail(home: Home, log_path: str | None) -> tuple[str, int, int]:
    """The end of the log for the page: text, the offset a stream continues from, bytes left out."""
    if log_path is None:
        return "", 0, 0
    try:
        fd = security.open_inside(home.root, Path(log_path))
    except OSError:
        return "", 0, 0
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        start = max(0, size - LOG_TAIL)
        fh.seek(start)
        data = fh.read(size - start)
    cut = data.rfind(b"\n") + 1
    data = data[:cut]
    return data.decode("utf-8", errors="replace"), start + len(data), start
