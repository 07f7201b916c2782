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

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import GeneratorBusy

MAX_ADAPTERS = 8
_DONE = object()


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

        from peft import PeftModel

        model = self._model
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
        stops = [s for s in request.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        produced: list[int] = []
        state: dict[str, Any] = {"sent": 0, "stopped": False, "done": "", "offset": 0}

        def text_now() -> str:
            """The answer so far: the settled text plus the tokens decoded since (never the whole answer again)."""
            tail = str(tokenizer.decode(produced[state["offset"]:], skip_special_tokens=True))
            # settle up to a line's end: what follows a newline decodes the same later, whatever comes next
            if tail.endswith("\n") and "\ufffd" not in tail:
                state["done"] += tail
                state["offset"] = len(produced)
                return str(state["done"])
            return str(state["done"]) + tail

        def cut_at_stop(text: str) -> tuple[str, bool]:
            found = [text.find(s) for s in stops if s in text]
            return (text[: min(found)], True) if found else (text, False)

        class Streamer(BaseStreamer):  # type: ignore[misc]  # transformers is not followed (Any)
            first = True

            def put(self, value: Any) -> None:
                if self.first:  # the prompt
                    self.first = False
                    return
                produced.extend(int(t) for t in value.reshape(-1).tolist())
                text, hit = cut_at_stop(text_now())
                state["stopped"] = hit
                # hold back what may be the start of a stop sequence, and a character still being decoded
                ready = len(text) if hit else max(state["sent"], len(text) - hold)
                if text.endswith("\ufffd"):
                    ready = min(ready, len(text) - 1)
                if ready > state["sent"]:
                    if request.stream:
                        request.emit(text[state["sent"]:ready])
                    state["sent"] = ready

            def end(self) -> None:
                pass

        class Stops(StoppingCriteria):  # type: ignore[misc]
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = bool(state["stopped"]) or request.cancelled.is_set()
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

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
        watch = request.stream or bool(stops)
        with context, torch.inference_mode():
            out = self._model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       streamer=Streamer() if watch else None,
                                       stopping_criteria=StoppingCriteriaList([Stops()]), **kwargs)
        if not watch:
            produced = [int(t) for t in out[0, prompt_len:].tolist()]
            state["offset"] = 0
        text, hit = cut_at_stop(text_now())
        if len(text) > state["sent"] and request.stream:
            request.emit(text[state["sent"]:])
        eos = tokenizer.eos_token_id
        ended = hit or bool(produced and eos is not None and produced[-1] == eos) or len(produced) < request.max_tokens
        return Finished(text, "stop" if ended else "length", prompt_len, len(produced))

