"""Generation for ``/v1/chat/completions`` and ``/v1/completions``: one base kept loaded, adapters swapped in.

The "try it" step of a fine-tuning workflow, not a production server. One thread
owns the model (torch, transformers and PEFT are imported there, on the first
request, never by the server's import); requests wait in a bounded queue (a full
queue is refused with 429 at once, never by blocking the server's event loop). A
request for another base unloads the one in memory first, so at most one base is
ever resident; adapters of that base are loaded into one PEFT model by name, the
least recently used dropped past :data:`MAX_ADAPTERS`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ApiError, GeneratorBusy

MAX_ADAPTERS = 8
#: A stream's chunks are at least this far apart: what the model makes meanwhile goes out in the next one.
#: A model slower than one token per gap streams token by token; a fast one sends ~50 chunks a second, not
#: one per token, whose event (its JSON, its write, the server's loop woken from the generation thread,
#: the client's parse) cost the tiny model as much again as the token itself.
STREAM_GAP_S = 0.02
#: Without stop sequences, the generation thread decodes what the model made at most this often.
DECODE_GAP_S = STREAM_GAP_S / 4


@dataclass
class Request:
    """One generation: a chat (``messages``) or a plain ``prompt``, on ``base`` with ``adapter`` (a folder) or none."""

    base: str
    adapter: str | None
    adapter_name: str | None
    messages: list[dict[str, Any]] | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    emit: Callable[[Any], None]  # called from the generation thread: a text piece, a Finished, or an Exception
    stream: bool = True  # False: only the Finished is emitted (no wake-up of the server's loop per token)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Outbox:
    """What the generation thread hands to one request's sender on the server's event loop.

    :meth:`put` (any thread) only appends under a lock; it wakes the loop only when the
    sender waits on an empty outbox, or for the last item. :meth:`take` (the loop) returns
    everything queued at once, so pieces made while a chunk was being written, or within
    ``not_before``, leave together.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[Any] = []
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: Any, *, last: bool = False) -> None:
        with self._lock:
            self._items.append(item)
            self._ended = self._ended or last
            waiter = self._waiter
            if waiter is None or not (last or len(self._items) == 1):
                return
            self._waiter = None
        self._loop.call_soon_threadsafe(_wake, waiter)

    async def take(self, not_before: float = 0.0) -> list[Any]:
        """The items queued, once there are some and the loop's clock has reached ``not_before`` (or the last came)."""
        while True:
            with self._lock:
                if self._items and (self._ended or self._loop.time() >= not_before):
                    items, self._items = self._items, []
                    return items
                waiter = self._waiter = self._loop.create_future()
                early = bool(self._items)
            try:
                await asyncio.wait_for(waiter, not_before - self._loop.time() if early else None)
            except TimeoutError:
                pass
            finally:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int


class Generator:
    def __init__(self, max_waiting: int = 16) -> None:
        self.requests: queue.Queue[Request | None] = queue.Queue(maxsize=max_waiting)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._base: str | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._adapters: OrderedDict[str, str] = OrderedDict()  # name -> folder, least recently used first

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="loraq-generate", daemon=True)
                self._thread.start()
        try:
            self.requests.put_nowait(request)
        except queue.Full:
            raise GeneratorBusy() from None

    def stop(self) -> None:
        if self._thread is not None:
            try:
                self.requests.put_nowait(None)
            except queue.Full:
                pass

    # ------------------------------------------------------------ the generation thread

    def _loop(self) -> None:
        while True:
            request = self.requests.get()
            if request is None:
                return
            if request.cancelled.is_set():
                continue
            try:
                request.emit(self._generate(request))
            except Exception as exc:  # the boundary: the request is answered with what went wrong
                request.emit(exc)

    def _load(self, base: str) -> None:
        if self._base == base:
            return
        import gc

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the server's stderr is for its own lines
        self._model = self._tokenizer = None
        self._adapters.clear()
        self._base = None
        gc.collect()
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
        model.eval()
        self._model, self._tokenizer, self._base = model, tokenizer, base

    def _use_adapter(self, name: str | None, folder: str | None) -> Any:
        """The model with adapter ``name`` active (loaded on first use), or the bare base's context."""
        import contextlib
        import os

        from peft import PeftModel

        model = self._model
        if folder is not None and name not in self._adapters and not os.path.isfile(os.path.join(folder,
                                                                                                "adapter_config.json")):
            # the folder a model name resolved to was removed before it was loaded (a checkpoint pruned)
            raise ApiError(404, "this checkpoint is no longer kept (a newer one replaced it): list the job's "
                                "checkpoints again", "model", "model_not_found")
        if name is None or folder is None:
            if isinstance(model, PeftModel):
                return model.disable_adapter()
            return contextlib.nullcontext()
        if not isinstance(model, PeftModel):
            model = self._model = PeftModel.from_pretrained(model, folder, adapter_name=name, is_trainable=False)
            self._adapters[name] = folder
        elif name not in self._adapters:
            model.load_adapter(folder, adapter_name=name, is_trainable=False)
            self._adapters[name] = folder
        self._adapters.move_to_end(name)
        model.set_adapter(name)
        while len(self._adapters) > MAX_ADAPTERS:
            old, _ = self._adapters.popitem(last=False)
            model.delete_adapter(old)
        model.eval()
        return contextlib.nullcontext()

    def _prompt_ids(self, request: Request) -> Any:
        tokenizer = self._tokenizer
        if request.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("this base model has no chat template: use /v1/completions with a prompt")
            text = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
            return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return tokenizer(request.prompt or "", return_tensors="pt")["input_ids"]

    def _generate(self, request: Request) -> Finished:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        self._load(request.base)
        context = self._use_adapter(request.adapter_name, request.adapter)
        tokenizer = self._tokenizer
        ids = self._prompt_ids(request)
        prompt_len = int(ids.shape[1])
        answer = Answer(tokenizer, [s for s in request.stop if s])

        class Streamer(BaseStreamer):  # type: ignore[misc]  # transformers is not followed (Any)
            def __init__(self) -> None:
                self.first = True
                self.waiting: list[int] = []  # tokens made but not decoded yet
                self.decoded_at = 0.0

            def put(self, value: Any) -> None:
                if self.first:  # the prompt
                    self.first = False
                    return
                self.waiting.extend(value.reshape(-1).tolist())
                # a stop is looked for at every token (generation ends there); without one, tokens are decoded
                # a few at a time: no more often than a stream could send them
                now = time.monotonic()
                if not answer.stops and now - self.decoded_at < DECODE_GAP_S:
                    return
                self.decoded_at = now
                piece = answer.add(self.waiting)
                self.waiting = []
                if piece and request.stream:
                    request.emit(piece)

            def end(self) -> None:
                pass

        class Stops(StoppingCriteria):  # type: ignore[misc]
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = answer.stopped or request.cancelled.is_set()
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

        streamer = Streamer()
        kwargs: dict[str, Any] = {"max_new_tokens": request.max_tokens,
                                  "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                  else tokenizer.eos_token_id}
        if request.temperature > 0:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        # a whole answer without stop sequences needs nothing per token: it is decoded once, at the end
        watch = request.stream or bool(answer.stops)
        with context, torch.inference_mode():
            out = self._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       streamer=streamer if watch else None,
                                       stopping_criteria=StoppingCriteriaList([Stops()]), **kwargs)
        if watch:
            rest = answer.add(streamer.waiting) + answer.finish()
            if rest and request.stream:
                request.emit(rest)
            text, produced = answer.final, answer.ids
        else:
            produced = [int(t) for t in out[0, prompt_len:].tolist()]
            text = str(tokenizer.decode(produced, skip_special_tokens=True))
        eos = tokenizer.eos_token_id
        ended = (answer.stopped or bool(produced and eos is not None and produced[-1] == eos)
                 or len(produced) < request.max_tokens)
        return Finished(text, "stop" if ended else "length", prompt_len, len(produced))


class Answer:
    """An answer's text as its tokens arrive: decoded a few tokens at a time, cut at the first stop sequence.

    Each new token is decoded with the few before it (the offsets of Hugging Face's
    text-generation-inference), never the whole answer again, so a token costs the same
    at the 2,000th as at the first. :meth:`add` returns the text that is now safe to
    send: whole characters only (a token that ends inside a multi-byte character waits
    for the rest) and never text past a stop sequence, nor the last ``len(stop) - 1``
    characters that may yet turn out to begin one.
    """

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""  # decoded so far, whole characters only
        self.sent = 0  # characters of text handed out
        self.stopped = False
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._prefix = 0  # ids[_prefix:_read] decode to the context the next tokens are decoded after
        self._read = 0

    @property
    def final(self) -> str:
        return self.text[:self.sent]

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _cut(self) -> str:
        """What may be sent now; at a stop sequence the text ends before it."""
        # text before `sent` held no stop's first character that the stop could still complete
        hits = [at for at in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if at >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            ready = len(self.text)
        else:
            ready = max(self.sent, len(self.text) - self._hold)
        piece, self.sent = self.text[self.sent:ready], max(self.sent, ready)
        return piece

    def _take_new(self, *, last: bool) -> None:
        """Append the text of the tokens not read yet, decoded after their context: whole characters only, unless
        ``last`` (the end of the answer, where a token's text is what it is)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (last or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = (len(self.ids), len(self.ids)) if last else (self._read, len(self.ids))

    def add(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        self._take_new(last=False)
        return self._cut()

    def finish(self) -> str:
        """The rest once generation has ended: what was held back, and a last token's text decoded whatever it is."""
        if not self.stopped:
            self._take_new(last=True)
            self._hold = 0
        return self._cut()
