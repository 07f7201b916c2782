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
import codecs
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
from ..escape import printable, printable_lines
from ..queue.records import STATES
from ..service.app import create_service
from ..workspace import Home
from . import security
from .feed import Change, Feed
from .render import LOG_TAIL, STATIC, JobView, Renderer

PAGE_SIZE = 100
#: Jobs on a page of the report (each with its curves and findings).
REPORT_PAGE = 50
#: The largest id, ``seq`` or byte offset a request may name: SQLite's integers (and a file offset).
MAX_NUMBER = 2**63 - 1
#: The most bytes of an action's form (a token and a return address), refused past this (413).
ACTION_BODY_BYTES = 16 * 1024
#: Bytes read from a file at a time when one is streamed (a log, a saved report).
CHUNK = 64 * 1024
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
    cookie: str = "loraq-token"  # ``loraq serve`` names it for its port: loraq-token-<port>
    max_body_bytes: int = security.MAX_BODY_BYTES  # a request body past this: 413, before it is read
    body_rules: tuple[security.BodyRule, ...] = ()  # other limits (and refusals) under path prefixes


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
        number = _page_number(request)
        if number is None:
            return message("no such page", "?page= takes a page number (1, 2, ...).", 400, "/")
        try:
            q = api.queue_page(home, status=status, group=group, offset=(number - 1) * PAGE_SIZE, limit=PAGE_SIZE)
        except LoraqError as exc:  # damaged, or being created: say so, and the page can be reloaded
            return message("cannot read the queue", str(exc), 503)
        pages = max(1, -(-q.total // PAGE_SIZE))

        def link(n: int) -> str:
            query = {k: v for k, v in (("status", status), ("group", group), ("page", str(n))) if v is not None}
            return "/?" + urlencode(query)

        newest = max((job.id for job in q.jobs), default=0)
        # The page's stream names what the page shows, so that it is sent only that.
        shown = {k: v for k, v in (("since", str(q.seq)), ("status", status), ("group", group), ("page", str(number)))
                 if v is not None}
        return page("queue.html", page=q, status=status, group=group, exists=home.db_path.exists(),
                    first=q.offset + 1 if q.jobs else 0, last=q.offset + len(q.jobs),
                    prev_url=link(number - 1) if number > 1 else None,
                    next_url=link(number + 1) if number < pages else None,
                    newest=newest, room=PAGE_SIZE - len(q.jobs) if number >= pages else 0,
                    stream_url="/stream?" + urlencode(shown))

    def job_page(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if job_id > MAX_NUMBER:
            return message("no such job", f"no job {job_id}", 404, "/")
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
        attempt_text = request.query_params.get("attempt")
        attempt = _number(attempt_text) if attempt_text is not None else None
        if job_id > MAX_NUMBER:
            return PlainTextResponse("no such job", status_code=404)
        if attempt_text is not None and attempt is None:
            return PlainTextResponse("?attempt= takes an attempt number", status_code=400)
        try:
            path = api.log_path(home, str(job_id), attempt)
            fd = security.open_inside(home.root, path)
        except LoraqError as exc:
            return PlainTextResponse(printable(exc), status_code=404 if isinstance(exc, NotFoundError) else 503)
        except OSError:  # outside the home, not a regular file, or gone
            return PlainTextResponse("no such log", status_code=404)
        # Streamed, a chunk at a time (a log can be gigabytes), escaped as `loraq logs` prints it.
        return StreamingResponse(_text_chunks(fd), media_type="text/plain; charset=utf-8")

    def report_page(request: Request) -> Response:
        if not home.db_path.exists():
            return message("no report yet", "No jobs in this home yet.", 200)
        number = _page_number(request)
        if number is None:
            return message("no such page", "?page= takes a page number (1, 2, ...).", 400, "/report")
        try:
            with api.open_reader(home) as store, store.snapshot():
                # A page of jobs at a time: the work (and the page) do not grow with the queue.
                total = store.listing_count()
                ids = [row["id"] for row in store.listing(offset=(number - 1) * REPORT_PAGE, limit=REPORT_PAGE)]
                built = report.build(store, home, [store.job(job_id) for job_id in ids])
        except LoraqError as exc:
            return message("cannot read the queue", str(exc), 503)
        pages = max(1, -(-total // REPORT_PAGE))
        saved = sorted(p.name for p in home.reports_dir.glob("*") if SAVED_REPORT.match(p.name) and p.is_file()) \
            if home.reports_dir.is_dir() else []
        from markupsafe import Markup

        # The report's HTML escapes markup; bidi and control characters in it are escaped here, as on every page.
        return page("report.html", body=Markup(printable_lines(report.body_html(built))), saved=saved,
                    first=(number - 1) * REPORT_PAGE + 1 if ids else 0, last=(number - 1) * REPORT_PAGE + len(ids),
                    total=total, paged=pages > 1,
                    prev_url=f"/report?page={number - 1}" if number > 1 else None,
                    next_url=f"/report?page={number + 1}" if number < pages else None)

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
        # Streamed from the checked descriptor, escaped as the pages are (a report's JSON is ASCII: unchanged).
        headers = {"content-security-policy": security.CSP_SAVED_REPORT}
        return StreamingResponse(_text_chunks(fd), media_type=kind, headers=headers)

    # ---------------------------------------------------------------- streams

    async def queue_stream(request: Request) -> Response:
        since = _number(request.headers.get("last-event-id") or request.query_params.get("since") or "0")
        status = request.query_params.get("status") or None
        group = request.query_params.get("group")
        number = _page_number(request)
        if since is None or number is None or (status is not None and status not in STATES):
            return PlainTextResponse("since, status and page name what the page shows: numbers, a status",
                                     status_code=400)
        try:
            view = await run_in_threadpool(_queue_view, home, status, group, number)
        except LoraqError:
            return PlainTextResponse("cannot read the queue now", status_code=503)
        subscription = feed.subscribe()

        async def step(news: Any) -> Step:
            if news is None:  # the stream opened: what changed since the page was drawn
                try:
                    behind = await run_in_threadpool(_changed_since, home, since)
                except LoraqError:  # unreadable this instant: end, and the browser reconnects in 2 s
                    return [], False
                if behind is None:
                    return [_event("reload", {})], False
                if not behind:
                    return [], True
                seq, counts, groups, queue = feed.totals()
                payload = renderer.queue_update(max(seq, max(r["seq"] for r in behind)), behind, counts, groups, queue)
                shown, event_id = view.select(payload), payload["seq"]
            elif isinstance(news, Change):
                shown, event_id = view.select(news.payload), news.seq
            else:
                return [], True
            return ([_event("queue", shown, event_id)] if shown is not None else []), True

        return _sse(_stream(feed, subscription, step, wait_s=KEEPALIVE_S))

    async def job_stream(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        last_id = request.headers.get("last-event-id", "")
        seq_text, _, log_text = last_id.partition(".") if last_id else ("", "", "")
        since_or_none = _number(seq_text or request.query_params.get("since") or "0")
        offset_or_none = _number(log_text or request.query_params.get("log") or "0")
        if job_id > MAX_NUMBER:
            return PlainTextResponse("no such job", status_code=404)
        if since_or_none is None or offset_or_none is None:
            return PlainTextResponse("since and log are numbers (what the page shows)", status_code=400)
        since, log_offset = since_or_none, offset_or_none
        log_path: Path | None = None
        subscription = feed.subscribe()

        async def step(news: Any) -> Step:
            nonlocal since, log_offset, log_path
            events: list[str] = []
            # The page just opened, or this job changed: read it again. Another job's change
            # costs this job's page nothing more than this check.
            if news is None or (isinstance(news, Change) and any(row["id"] == job_id for row in news.rows)):
                shown = await run_in_threadpool(_show, home, job_id)
                if shown is None:
                    return [], False
                if shown.job.seq > since:
                    since = shown.job.seq
                    events.append(_event("job", {"sections": renderer.job_sections(JobView.of(shown))},
                                         f"{since}.{log_offset}"))
                newest = Path(shown.log_path) if shown.log_path else None
                if newest != log_path and log_path is not None:
                    log_offset = 0  # a new attempt: follow its log from the start
                    events.append(_event("log", {"text": "", "reset": True}, f"{since}.{log_offset}"))
                log_path = newest
            if log_path is not None:
                text, log_offset = await run_in_threadpool(_log_from, home, log_path, log_offset)
                if text:
                    events.append(_event("log", {"text": text}, f"{since}.{log_offset}"))
            return events, True

        return _sse(_stream(feed, subscription, step, wait_s=LOG_POLL_S))

    # ---------------------------------------------------------------- actions

    async def act(request: Request) -> Response:
        # The gate has seen the cookie or the header before this reads the body (at most ACTION_BODY_BYTES).
        form = await _form(request)
        given = form.get("token") or request.headers.get("x-loraq-token")
        if not security.same_token(given if isinstance(given, str) else None, settings.token):
            return message("refused", "This action needs the dashboard's token (from the link loraq serve printed).", 403)
        if not security.same_origin(request.headers, request.url.scheme):
            return message("refused", "This action came from another site's page.", 403)
        verb = request.path_params["verb"]
        job_id = request.path_params.get("job_id")
        if job_id is not None and job_id > MAX_NUMBER:
            return message("no such job", f"no job {job_id}", 404, "/")
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
    # Bodies are refused past their limit before they are read: an action's form is small.
    bodies = security.BodyLimit(app, settings.max_body_bytes, rules=(
        security.BodyRule("/jobs/", min(ACTION_BODY_BYTES, settings.max_body_bytes)),
        security.BodyRule("/queue/", min(ACTION_BODY_BYTES, settings.max_body_bytes)), *settings.body_rules))
    cookie_secret = security.cookie_value(settings.token, settings.cookie)

    def has_token(request: Request) -> bool:
        """The cookie this dashboard set, or the token itself in the header a script sends."""
        return (security.same_token(request.cookies.get(settings.cookie), cookie_secret)
                or security.same_token(request.headers.get("x-loraq-token"), settings.token))

    verbs = {("jobs", "cancel"), ("jobs", "retry"), ("queue", "pause"), ("queue", "resume")}
    v1 = create_service(home, settings.token)

    async def gate(scope: Any, receive: Any, send: Any) -> None:
        """Host check, token check, and the POST-only verbs, before any route runs."""
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request = Request(scope, receive)
        if request.method != "POST" and security.has_body(scope):
            send = security.closing(send)  # a body nobody reads: the connection ends with the answer
        if not security.host_allowed(request.headers.get("host"), settings.host):
            await PlainTextResponse("unknown host", status_code=403)(scope, receive, send)
            return
        path = request.url.path
        if path == "/v1" or path.startswith("/v1/"):  # its own keys (or the token as a bearer), its own errors
            await v1(scope, receive, send)
            return
        parts = path.strip("/").split("/")
        if request.method == "POST":
            if not ((parts[0], parts[-1]) in verbs and len(parts) in (2, 3)):
                await PlainTextResponse("no such action", status_code=404,
                                        headers={"connection": "close"})(scope, receive, send)
                return
            if not has_token(request):  # refused before a byte of the body is read
                await HTMLResponse(renderer.page(
                    "message.html", title="refused", back=None,
                    message="This action needs the dashboard's token (from the link loraq serve printed)."),
                    status_code=403, headers={"connection": "close"})(scope, receive, send)
                return
            await bodies(scope, receive, send)
            return
        if path.startswith("/static/") or path == "/report.css":
            await bodies(scope, receive, send)
            return
        given = request.query_params.get("token")
        if given is not None and request.method == "GET" and security.same_token(given, settings.token):
            # The link's token becomes a cookie, and leaves the address bar (and the history); the
            # address it returns to is this dashboard's, whatever the path looks like (//evil.example/).
            query = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = security.local_path(path + ("?" + urlencode(query) if query else ""), "/")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(settings.cookie, cookie_secret, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            await response(scope, receive, send)
            return
        if not has_token(request):
            await HTMLResponse(renderer.page(
                "message.html", title="the dashboard needs its token",
                message="Open the link that 'loraq serve' printed when it started (it ends in ?token=…).",
                back=None), status_code=403)(scope, receive, send)
            return
        await bodies(scope, receive, send)

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

#: What a page's stream step returns: the events to send now, and whether the stream goes on.
Step = tuple[list[str], bool]


async def _stream(feed: Feed, subscription: asyncio.Queue[Change | None],
                  step: Callable[[Any], Awaitable[Step]], *, wait_s: float) -> AsyncIterator[str]:
    """The one server-sent-events loop that every page's stream runs.

    ``step`` is called with ``None`` when the stream opens, with each :class:`Change`
    the feed sends, and with ``_QUIET`` when ``wait_s`` passes without one; it returns
    the events to send and whether to go on. A comment keeps the connection open when
    nothing was sent for ``KEEPALIVE_S``. The stream ends when the step says so or the
    feed does (it stopped, or the page fell behind); the browser reconnects after the
    ``retry`` it was told.
    """
    quiet = 0.0
    try:
        yield "retry: 2000\n\n"
        news: Any = None
        while True:
            events, more = await step(news)
            for event in events:
                yield event
            if not more:
                return
            quiet = 0.0 if events else quiet + (wait_s if news is _QUIET else 0.0)
            if quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield ": keep-alive\n\n"
            news = await _next(subscription, timeout=wait_s)
            if news is None:  # the feed stopped, or this page fell behind: it reconnects
                return
    finally:
        feed.unsubscribe(subscription)


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
    body = await request.body()  # at most ACTION_BODY_BYTES: BodyLimit refuses more, unread
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", errors="replace")).items()}


_DIGITS = re.compile(r"[0-9]{1,19}")


def _number(text: str) -> int | None:
    """A count, id or offset a request names: ASCII digits within SQLite's integers, else ``None``."""
    if not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_NUMBER else None


def _page_number(request: Request) -> int | None:
    """``?page=`` (1 when absent, 0 read as 1); ``None`` if it is no page number a queue could have."""
    number = _number(request.query_params.get("page") or "1")
    if number is None or number > MAX_NUMBER // PAGE_SIZE:
        return None
    return max(1, number)


@dataclass
class QueueView:
    """What one open queue page shows, so that its stream sends it that and no more.

    Rows of jobs on the page (and new jobs the last page has room for) are sent
    whole; jobs of the page's filter that it does not list are only counted (the
    page offers a reload); other jobs' changes reach it as the totals above the table.
    """

    status: str | None
    group: str | None
    shown: set[int]
    newest: int
    room: int
    sections: dict[str, str] | None = None  # the totals last sent

    def belongs(self, row: dict[str, Any]) -> bool:
        return (self.status is None or row["status"] == self.status) and (self.group is None
                                                                          or row["group"] == self.group)

    def select(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The part of a queue update (``Renderer.queue_update``) this page shows; ``None`` if nothing."""
        rows, unseen = [], 0
        for row in payload["rows"]:
            if row["id"] in self.shown:
                rows.append(row)
            elif self.belongs(row):
                if row["id"] > self.newest and self.room > 0:  # a new job, and the last page has room
                    rows.append(row)
                    self.shown.add(row["id"])
                    self.newest, self.room = row["id"], self.room - 1
                else:
                    unseen += 1
        sections = payload["sections"]
        if not rows and not unseen and sections == self.sections:
            return None
        self.sections = sections
        return {"seq": payload["seq"], "rows": rows, "unseen": unseen, "sections": sections}


def _queue_view(home: Home, status: str | None, group: str | None, number: int) -> QueueView:
    q = api.queue_page(home, status=status, group=group, offset=(number - 1) * PAGE_SIZE, limit=PAGE_SIZE)
    pages = max(1, -(-q.total // PAGE_SIZE))
    return QueueView(status, group, {job.id for job in q.jobs}, max((job.id for job in q.jobs), default=0),
                     PAGE_SIZE - len(q.jobs) if number >= pages else 0)


def _text_chunks(fd: int) -> Iterator[bytes]:
    """A whole file (a log, a saved report), a chunk at a time, as UTF-8 text with control and bidi
    characters escaped (as ``loraq logs`` prints them). Run in a worker thread by Starlette; closes ``fd``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size  # what it holds now: a growing log is followed on the job's page
        left = size
        while left > 0:
            data = fh.read(min(CHUNK, left))
            if not data:
                break
            left -= len(data)
            yield printable_lines(decoder.decode(data)).encode("utf-8")
        yield printable_lines(decoder.decode(b"", final=True)).encode("utf-8")


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
    return printable_lines(data.decode("utf-8", errors="replace")), start + len(data)


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
    return printable_lines(data.decode("utf-8", errors="replace")), start + len(data), start
