"""The ``/v1`` ASGI app: OpenAI's fine-tuning API (files, jobs, events, checkpoints, models, completions).

    POST /v1/files                       upload (multipart, purpose=fine-tune), checked in full
    GET  /v1/files[/{id}[/content]]      list, retrieve, download;  DELETE /v1/files/{id}
    POST /v1/fine_tuning/jobs            create;  GET: list (after, limit, metadata[k]=v)
    GET  /v1/fine_tuning/jobs/{id}       retrieve;  POST .../{id}/cancel|pause|resume
    GET  /v1/fine_tuning/jobs/{id}/events|checkpoints
    GET  /v1/models[/{id}]               the home's base models and this key's fine-tuned ones
    POST /v1/chat/completions, /v1/completions   generate (stream: server-sent events)

Every request needs ``Authorization: Bearer <key>`` (``loraq keys create``), or the
dashboard's token (the operator: sees everything). A key sees only what it made;
anything else answers 404 as if it did not exist. Bodies over the home's limits are
answered 413 from their Content-Length, before they are read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import api
from ..errors import BodyTooLarge, GeneratorBusy, LoraqError, NotFoundError
from ..escape import excerpt
from ..workspace import API_DEFAULTS, Home
from . import completions
from . import files as files_mod
from . import jobs as jobs_mod
from .errors import ApiError, bad_request, not_found, too_large, unauthorized
from .generate import STREAM_GAP_S, Finished, Generator, Outbox
from .generate import Request as GenRequest
from .state import OPERATOR, ApiState

JOBS_PAGE, EVENTS_PAGE, CHECKPOINTS_PAGE, FILES_PAGE = 20, 20, 10, 10_000


@dataclass
class Caller:
    key_id: int
    name: str


class Service:
    """The /v1 app for one home; ``operator_token`` is the dashboard's."""

    def __init__(self, home: Home, operator_token: str) -> None:
        self.home = home
        self.operator_token = operator_token
        self._state: ApiState | None = None
        self._state_lock = threading.Lock()
        self.limits = self._limits()
        self.generator = Generator(self.limits["generation_queue"])
        self.router = Starlette(routes=[
            Route("/v1/files", self.files, methods=["GET", "POST"]),
            Route("/v1/files/{file_id:str}", self.file, methods=["GET", "DELETE"]),
            Route("/v1/files/{file_id:str}/content", self.file_content, methods=["GET"]),
            Route("/v1/fine_tuning/jobs", self.jobs, methods=["GET", "POST"]),
            Route("/v1/fine_tuning/jobs/{job_id:str}", self.job, methods=["GET"]),
            Route("/v1/fine_tuning/jobs/{job_id:str}/events", self.events, methods=["GET"]),
            Route("/v1/fine_tuning/jobs/{job_id:str}/checkpoints", self.checkpoints, methods=["GET"]),
            Route("/v1/fine_tuning/jobs/{job_id:str}/{verb:str}", self.act, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ], exception_handlers={ApiError: self._api_error, HTTPException: self._http_error, BodyTooLarge: self._too_large,
                               NotFoundError: self._not_found, LoraqError: self._unavailable, Exception: self._bug})

    # Every refusal in OpenAI's shape, whatever raised it.

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error(exc)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return _error(ApiError(405, f"Method {request.method} is not allowed on {excerpt(request.url.path, 200)}",
                                   None, "method_not_allowed"))
        return _error(ApiError(exc.status_code, f"Unknown request URL: {request.method} "
                                                f"{excerpt(request.url.path, 200)}", None, "unknown_url"))

    async def _too_large(self, request: Request, exc: Exception) -> Response:
        upload = request.url.path == "/v1/files"
        return _error(too_large(self.limits["max_upload_bytes" if upload else "max_body_bytes"],
                                "upload" if upload else "request body"), close=True)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error(not_found(excerpt(str(exc), 300)))

    async def _unavailable(self, request: Request, exc: Exception) -> Response:
        return _error(ApiError(503, f"cannot read the queue now: {excerpt(str(exc), 200)}", None, "unavailable",
                               "server_error"))

    async def _bug(self, request: Request, exc: Exception) -> Response:
        return _error(ApiError(500, f"internal error (a bug in loraq): {type(exc).__name__}", None, "server_error",
                               "server_error"))

    def _limits(self) -> dict[str, int]:
        try:
            return dict(self.home.config().api)
        except LoraqError:
            return dict(API_DEFAULTS)

    @property
    def state(self) -> ApiState:
        """``<home>/api.db``, made on the first request that needs it (never by starting the server)."""
        with self._state_lock:
            if self._state is None:
                self._state = ApiState.of_home(self.home.root)
            return self._state

    # ------------------------------------------------------------ the edge

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        limit = self.limits["max_upload_bytes"] if path == "/v1/files" else self.limits["max_body_bytes"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _error(bad_request("Content-Length is not a number", None, "invalid_request"))(scope, receive, send)
                return
            if int(length) > limit:  # answered unread: the connection closes after the answer
                await _error(too_large(limit, "upload" if path == "/v1/files" else "request body"),
                             close=True)(scope, receive, send)
                return
        seen = 0

        async def bounded() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            caller = await run_in_threadpool(self._caller, headers.get("authorization"))
        except ApiError as exc:
            await _error(exc)(scope, receive, send)
            return
        scope = dict(scope, loraq_caller=caller)
        try:
            await self.router(scope, bounded, send)
        except Exception:  # noqa: S110 - answered already in OpenAI's shape (Starlette re-raises after its handler)
            pass

    def _caller(self, authorization: str | None) -> Caller:
        scheme, _, given = (authorization or "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise unauthorized("You didn't provide an API key: send 'Authorization: Bearer <key>' "
                               "(a key from 'loraq keys create NAME').")
        if secrets.compare_digest(given.encode("utf-8", "replace"), self.operator_token.encode()):
            return Caller(OPERATOR, "operator")
        key = self.state.key_for(given)
        if key is None:
            raise unauthorized("Incorrect API key provided. Keys come from 'loraq keys create NAME' on the server.")
        return Caller(key.id, key.name)

    # ------------------------------------------------------------ files

    async def files(self, request: Request) -> Response:
        caller = _who(request)
        if request.method == "GET":
            limit = _limit(request, FILES_PAGE, 10_000)
            after = request.query_params.get("after")
            purpose = request.query_params.get("purpose")
            found, more = await run_in_threadpool(self.state.files, caller.key_id, after=after, limit=limit,
                                                  purpose=purpose)
            return _json(jobs_mod.list_json([files_mod.file_json(f) for f in found], more))
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("an upload is multipart/form-data with 'file' and 'purpose'", "file", "invalid_request")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except BodyTooLarge:
            raise
        except Exception as exc:  # the multipart parser's refusals
            raise bad_request(f"cannot read the upload: {excerpt(str(exc), 200)}", "file", "invalid_request") from None
        try:
            upload = form.get("file")
            purpose = form.get("purpose")
            if upload is None or isinstance(upload, str):
                raise bad_request("the upload has no 'file' part", "file", "missing")
            if not isinstance(purpose, str):
                raise bad_request("the upload has no 'purpose' field (use purpose=fine-tune)", "purpose", "missing")

            def chunks() -> Any:
                while True:
                    block = upload.file.read(files_mod.CHUNK)
                    if not block:
                        return
                    yield block

            stored = await run_in_threadpool(
                files_mod.save_upload, self.home, self.state, key_id=caller.key_id, filename=upload.filename or "",
                purpose=purpose, chunks=chunks(), max_bytes=self.limits["max_upload_bytes"])
        finally:
            await form.close()
        return _json(files_mod.file_json(stored))

    async def file(self, request: Request) -> Response:
        caller = _who(request)
        file_id = request.path_params["file_id"]
        if request.method == "DELETE":
            stored = await run_in_threadpool(self._file_call, partial(files_mod.delete, self.home, self.state),
                                             file_id, caller.key_id)
            return _json({"id": stored.id, "object": "file", "deleted": True})
        stored = await run_in_threadpool(self._file_call, self.state.file, file_id, caller.key_id)
        return _json(files_mod.file_json(stored))

    def _file_call(self, method: Callable[..., Any], file_id: str, key_id: int) -> Any:
        try:
            return method(file_id, key_id)
        except NotFoundError:
            raise not_found(f"No such File object: {excerpt(file_id, 100)}", "id") from None

    async def file_content(self, request: Request) -> Response:
        caller = _who(request)
        stored = await run_in_threadpool(self._file_call, self.state.file, request.path_params["file_id"], caller.key_id)
        data = await run_in_threadpool(files_mod.read_blob, self.home, stored)
        return Response(data, media_type="application/octet-stream")

    # ------------------------------------------------------------ jobs

    async def jobs(self, request: Request) -> Response:
        caller = _who(request)
        if request.method == "POST":
            body = await _body(request)
            api_job = await run_in_threadpool(jobs_mod.create, self.home, self.state, caller.key_id, body)
            return _json(await run_in_threadpool(self._job_json, api_job))
        limit = _limit(request, JOBS_PAGE, 100)
        metadata, null = _metadata_filter(request)
        return _json(await run_in_threadpool(self._list_jobs, caller, request.query_params.get("after"), limit,
                                             metadata, null))

    def _list_jobs(self, caller: Caller, after: str | None, limit: int, metadata: dict[str, str],
                   null: bool) -> dict[str, Any]:
        found, more = self.state.jobs(caller.key_id, after=after, limit=limit, metadata=metadata, null_metadata=null)
        if not found:
            return jobs_mod.list_json([], False)
        with api.open_reader(self.home) as store:
            data = [jobs_mod.job_json(self.home, j, store.job(j.job_id), jobs_mod.owner_label(j.key_id)) for j in found]
        return jobs_mod.list_json(data, more)

    def _job_json(self, api_job: Any) -> dict[str, Any]:
        with api.open_reader(self.home) as store:
            job = store.job(api_job.job_id)
        return jobs_mod.job_json(self.home, api_job, job, jobs_mod.owner_label(api_job.key_id))

    async def job(self, request: Request) -> Response:
        caller = _who(request)
        api_job = await run_in_threadpool(jobs_mod.owned, self.state, request.path_params["job_id"], caller.key_id)
        return _json(await run_in_threadpool(self._job_json, api_job))

    async def act(self, request: Request) -> Response:
        caller = _who(request)
        verb = request.path_params["verb"]
        if verb not in ("cancel", "pause", "resume"):
            raise not_found(f"Unknown request URL: POST {excerpt(request.url.path, 200)}")
        api_job = await run_in_threadpool(jobs_mod.owned, self.state, request.path_params["job_id"], caller.key_id)
        await run_in_threadpool(jobs_mod.act, self.home, self.state, api_job, verb)
        api_job = await run_in_threadpool(jobs_mod.owned, self.state, api_job.id, caller.key_id)
        return _json(await run_in_threadpool(self._job_json, api_job))

    async def events(self, request: Request) -> Response:
        caller = _who(request)
        api_job = await run_in_threadpool(jobs_mod.owned, self.state, request.path_params["job_id"], caller.key_id)
        items = await run_in_threadpool(jobs_mod.events, self.home, api_job)
        return _json(jobs_mod.page(items, request.query_params.get("after"), _limit(request, EVENTS_PAGE, 1000)))

    async def checkpoints(self, request: Request) -> Response:
        caller = _who(request)
        api_job = await run_in_threadpool(jobs_mod.owned, self.state, request.path_params["job_id"], caller.key_id)
        items = await run_in_threadpool(jobs_mod.checkpoints_json, self.home, api_job)
        return _json(jobs_mod.page(items, request.query_params.get("after"), _limit(request, CHECKPOINTS_PAGE, 100)))

    # ------------------------------------------------------------ models

    def _model_list(self, caller: Caller) -> list[dict[str, Any]]:
        out = [{"id": name, "object": "model", "created": 0, "owned_by": "loraq"}
               for name in jobs_mod.base_models(self.home)]
        after = None
        while True:
            found, more = self.state.jobs(caller.key_id, after=after, limit=500)
            if not found:
                break
            with api.open_reader(self.home) as store:
                for api_job in found:
                    job = store.job(api_job.job_id)
                    if jobs_mod.is_published(self.home, job):
                        out.append({"id": jobs_mod.fine_tuned_model(api_job), "object": "model",
                                    "created": int(job.finished_at or api_job.created_at),
                                    "owned_by": jobs_mod.owner_label(api_job.key_id)})
            if not more:
                break
            after = found[-1].id
        return out

    async def models(self, request: Request) -> Response:
        caller = _who(request)
        data = await run_in_threadpool(self._model_list, caller)
        return _json({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        caller = _who(request)
        name = request.path_params["model"]
        base, _, _ = await run_in_threadpool(self._resolve, caller, name)
        return _json({"id": name, "object": "model", "created": 0, "owned_by": "loraq"})

    def _resolve(self, caller: Caller, name: Any) -> tuple[str, str | None, str | None]:
        """``(base folder or hub id, adapter folder, adapter name)`` for a model a request names."""
        if not isinstance(name, str) or not name:
            raise bad_request("model is required", "model", "missing")
        bases = jobs_mod.base_models(self.home)
        if name in bases:
            return bases[name], None, None
        missing = ApiError(404, f"The model `{excerpt(name, 100)}` does not exist or you do not have access to it.",
                           "model", "model_not_found")
        parts = name.split(":")
        if len(parts) not in (4, 5) or parts[0] != "ft":
            raise missing
        try:
            api_job = self.state.job(parts[3], caller.key_id)
        except NotFoundError:
            raise missing from None
        if jobs_mod.fine_tuned_model(api_job) != ":".join(parts[:4]) or api_job.model not in bases:
            raise missing
        with api.open_reader(self.home) as store:
            job = store.job(api_job.job_id)
        if len(parts) == 5:  # a checkpoint, as GET .../checkpoints names it
            folder = jobs_mod.checkpoint_adapter(self.home, job, parts[4])
            if folder is None:
                raise missing
            # named for its folder: a later attempt saving the same step is another adapter
            tag = hashlib.sha256(bytes(folder)).hexdigest()[:8]
            return bases[api_job.model], str(folder), f"{api_job.id}-{parts[4]}-{tag}"
        if not jobs_mod.is_published(self.home, job):
            raise missing
        return bases[api_job.model], str(self.home.adapter_dir(job.name)), api_job.id

    # ------------------------------------------------------------ completions

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, *, chat: bool) -> Response:
        caller = _who(request)
        body = await _body(request)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_type")
        allowed = completions.CHAT_KEYS if chat else completions.COMPLETION_KEYS
        for key in body:
            if key not in allowed:
                raise bad_request(f"{excerpt(key)}: unknown parameter", str(key)[:100], "unknown_parameter")
        options = completions.options(body, chat, self.limits["max_tokens"])
        base, adapter, adapter_name = await run_in_threadpool(self._resolve, caller, body.get("model"))
        model = str(body["model"])
        stream = body.get("stream") is True
        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        outbox = Outbox(asyncio.get_running_loop())

        def emit(item: Any) -> None:
            outbox.put(item, last=isinstance(item, Finished | Exception))

        job = GenRequest(base=base, adapter=adapter, adapter_name=adapter_name, emit=emit, stream=stream, **options)
        try:
            self.generator.submit(job)
        except GeneratorBusy:
            raise ApiError(429, "too many generation requests are waiting; try again shortly", None,
                           "rate_limit_exceeded", "requests") from None
        if not stream:
            try:
                item = (await outbox.take())[-1]
            finally:
                job.cancelled.set()
            if isinstance(item, Exception):
                raise completions.error_of(item)
            usage = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                     "total_tokens": item.prompt_tokens + item.completion_tokens}
            if chat:
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": item.text,
                                                                  "refusal": None},
                                          "finish_reason": item.finish_reason, "logprobs": None}
                return _json({"id": ident, "object": "chat.completion", "created": created, "model": model,
                              "choices": [choice], "usage": usage, "system_fingerprint": None})
            return _json({"id": ident, "object": "text_completion", "created": created, "model": model,
                          "choices": [{"index": 0, "text": item.text, "finish_reason": item.finish_reason,
                                       "logprobs": None}], "usage": usage})

        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict[str, Any] | str | None, finish: str | None, usage: Any = None,
                  empty: bool = False) -> str:
            choices: list[dict[str, Any]] = []
            if not empty:
                choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if chat else \
                    [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]
            doc = {"id": ident, "object": kind, "created": created, "model": model, "choices": choices,
                   "system_fingerprint": None}
            if include_usage:
                doc["usage"] = usage
            return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""}, None)
                sent_at = 0.0
                while True:
                    # all that came since the last chunk goes out as one, at most one chunk per STREAM_GAP_S
                    items = await outbox.take(sent_at + STREAM_GAP_S)
                    text = "".join(item for item in items if isinstance(item, str))
                    if text:
                        yield chunk({"content": text} if chat else text, None)
                        sent_at = asyncio.get_running_loop().time()
                    item = items[-1]
                    if isinstance(item, Exception):
                        error = completions.error_of(item)
                        yield f"data: {json.dumps(error.to_json())}\n\n"
                        return
                    if isinstance(item, Finished):
                        yield chunk({} if chat else "", item.finish_reason)
                        if include_usage:
                            yield chunk(None, None, {"prompt_tokens": item.prompt_tokens,
                                                     "completion_tokens": item.completion_tokens,
                                                     "total_tokens": item.prompt_tokens + item.completion_tokens},
                                        empty=True)
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancelled.set()  # the client went away: the generation thread stops at its next token

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-store"})

    def close(self) -> None:
        self.generator.stop()
        if self._state is not None:
            self._state.close()


# ---------------------------------------------------------------- request parts


def _who(request: Request) -> Caller:
    caller: Caller = request.scope["loraq_caller"]
    return caller


async def _body(request: Request) -> Any:
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise bad_request("the request ended before its body", None, "invalid_request") from None
    if not raw:
        raise bad_request("the request has no JSON body", None, "invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {excerpt(str(exc), 120)}", None,
                          "invalid_json") from None


def _limit(request: Request, default: int, most: int) -> int:
    text = request.query_params.get("limit")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= most:
        raise bad_request(f"limit must be an integer from 1 to {most}", "limit", "invalid_value")
    return int(text)


def _metadata_filter(request: Request) -> tuple[dict[str, str], bool]:
    found: dict[str, str] = {}
    null = False
    for key, value in request.query_params.multi_items():
        if key == "metadata":
            if value != "null":
                raise bad_request("metadata filters are metadata[KEY]=VALUE, or metadata=null", "metadata",
                                  "invalid_value")
            null = True
        elif key.startswith("metadata[") and key.endswith("]"):
            name = key[len("metadata["):-1]
            if not name or '"' in name or "\\" in name or len(name) > 64:
                raise bad_request("a metadata key is 1-64 characters", "metadata", "invalid_value")
            found[name] = value
    if null and found:
        raise bad_request("metadata=null and metadata[KEY] filters do not combine", "metadata", "invalid_value")
    return found, null


def _json(doc: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(doc, status_code=status)


def _error(exc: ApiError, *, close: bool = False) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status, headers={"connection": "close"} if close else None)


def create_service(home: Home, operator_token: str) -> Service:
    """The /v1 app of ``home``; ``operator_token`` (the dashboard's) sees everything."""
    return Service(home, operator_token)
