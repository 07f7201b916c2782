"""Encoding: a checked row becomes token ids and labels, with the loss on what the model should learn.

Encoding works on character spans: a row becomes one string plus the spans that
carry loss, the string is tokenised once with offsets, and a token carries a label
when it starts inside a trainable span. That is exact for any fast tokenizer and
any chat template that renders a conversation as a prefix of its continuation.
Many rows are rendered and tokenised in one batch (:func:`render_many`,
:func:`tokenize_many`); :func:`encode` is the same code for one row.

Rows must already be checked (:mod:`loraq.data`). No torch is imported here.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import TemplateBudgetError, TemplateError

IGNORE_INDEX = -100
#: The field whose text carries the loss, per flat format.
TRAINED_KEY = {"prompt_completion": "completion", "alpaca": "output", "text": "text"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
#: Why a chat dataset cannot be rendered: the field that fixes it is named.
NO_TEMPLATE = ("the base model's tokenizer has no chat template, and chat datasets need one: set the job's "
               "chat_template (a built-in such as chatml, or a .jinja file)")


def is_trained(message: dict[str, Any]) -> bool:
    """Whether a chat message carries loss: an assistant turn without ``weight: 0``."""
    return message.get("role") == "assistant" and message.get("weight") != 0  # no weight (or null) means 1


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    """A row as one string and the character spans that carry loss."""

    text: str
    spans: tuple[tuple[int, int], ...]
    add_special_tokens: bool = True


def render(row: dict[str, Any], fmt: str, tokenizer: Any, chat_template: str | None = None) -> Rendered:
    result = render_many([row], fmt, tokenizer, chat_template)[0]
    if isinstance(result, TemplateError):
        raise result
    return result


def render_many(rows: Sequence[dict[str, Any]], fmt: str, tokenizer: Any,
                chat_template: str | None = None) -> list[Rendered | TemplateError]:
    """Render checked rows; a chat row the template cannot render gets a TemplateError in its place.

    ``chat_template`` (a job's, see :mod:`.templates`) replaces the tokenizer's own.
    Raises TemplateError when there is no chat template at all (a chat dataset needs one).
    """
    if fmt == "chat":
        return _render_chats([row["messages"] for row in rows], tokenizer, chat_template)
    if fmt not in TRAINED_KEY:
        raise ValueError(f"unknown format {fmt!r}")
    eos = getattr(tokenizer, "eos_token", None) or ""
    return [_render_flat(row, fmt, eos) for row in rows]


def _render_flat(row: dict[str, Any], fmt: str, eos: str) -> Rendered:
    if fmt == "text":
        text = row["text"] + eos
        return Rendered(text, ((0, len(text)),))
    if fmt == "prompt_completion":
        prompt = row["prompt"]
        trained = row["completion"] + eos
    else:
        template = ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT
        prompt = template.format(instruction=row["instruction"], input=row.get("input") or "")
        trained = row["output"] + eos
    return Rendered(prompt + trained, ((len(prompt), len(prompt) + len(trained)),))


class ChatTemplate:
    """A tokenizer's chat template (or ``template``, a job's own), rendering many conversations at a time.

    ``apply_chat_template`` is the reference. Rendering with loraq's own Jinja
    environment (:func:`.templates.render_chat`, what the torch-free submit renders
    with) is about 2.5x faster on a large file; it is used only once it has rendered a
    sample exactly as ``apply_chat_template`` does, so every training run checks it
    against transformers.
    """

    SAMPLE = 4

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        template = template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise TemplateError(NO_TEMPLATE)
        self.tokenizer = tokenizer
        self.template = template
        self._direct: Any = None
        self._kwargs: dict[str, Any] = {}
        self._checked = False
        direct = template.get("default") if isinstance(template, dict) else template
        if isinstance(direct, str):  # rendered with loraq's own Jinja environment (templates.render_chat)
            self._direct = direct
            self._kwargs = dict(getattr(tokenizer, "special_tokens_map", {}) or {})

    def _public(self, conversations: list[list[dict[str, Any]]], generation_prompt: bool) -> list[str]:
        from . import budget

        # transformers' own Jinja environment: the time budget holds (data/budget.py); what a template builds was
        # checked when loraq's environment rendered the same conversations first (render: the sample)
        out = budget.within(lambda: self.tokenizer.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=generation_prompt, chat_template=self.template),
            seconds=budget.SECONDS + budget.SECONDS_EACH * len(conversations))
        return [str(text) for text in out]

    def _fast(self, conversations: list[list[dict[str, Any]]], generation_prompt: bool) -> list[str]:
        from .templates import render_chat

        return render_chat(self._direct, conversations, add_generation_prompt=generation_prompt,
                           special_tokens=self._kwargs)

    def render(self, conversations: list[list[dict[str, Any]]], generation_prompt: bool) -> list[str | TemplateError]:
        if not conversations:
            return []
        if self._direct is not None and not self._checked:
            # loraq's environment first, within the whole budget (data/budget.py): a template that runs away
            # stops there, before transformers renders with it
            self._checked = True
            sample = conversations[: self.SAMPLE]
            try:
                same = self._fast(sample, generation_prompt) == self._public(sample, generation_prompt)
            except TemplateBudgetError:
                raise
            except Exception:
                same = False
            if not same:
                self._direct = None
        try:
            if self._direct is not None and self._checked:
                return list(self._fast(conversations, generation_prompt))
            return list(self._public(conversations, generation_prompt))
        except TemplateBudgetError:
            raise  # the template is at fault, not a conversation: rendering stops at the first
        except Exception:
            # some conversation the template rejects (e.g. roles that do not alternate): find which
            return [self._one(c, generation_prompt) for c in conversations]

    def _one(self, conversation: list[dict[str, Any]], generation_prompt: bool) -> str | TemplateError:
        try:
            return self._public([conversation], generation_prompt)[0]
        except TemplateBudgetError:
            raise
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return TemplateError(f"the chat template rejects this conversation: {first_line[:200]}")


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    # weight is loraq's; None values are dropped as apply_chat_template does (Parquet structs have them)
    return {k: v for k, v in message.items() if k != "weight" and v is not None}


def _render_chats(conversations: Sequence[Sequence[dict[str, Any]]], tokenizer: Any,
                  chat_template: str | None = None) -> list[Rendered | TemplateError]:
    template = ChatTemplate(tokenizer, chat_template)
    clean = [[_template_message(m) for m in conversation] for conversation in conversations]
    fulls = template.render(clean, False)
    # A trained turn spans from the end of the text before it (with the assistant header)
    # to the end of the text through it (with the end-of-turn marker).
    befores: list[tuple[int, int]] = []
    uptos: list[tuple[int, int]] = []
    for c, conversation in enumerate(conversations):
        if isinstance(fulls[c], str):
            for t, message in enumerate(conversation):
                if is_trained(message):
                    if t > 0:
                        befores.append((c, t))
                    if t < len(conversation) - 1:  # the last turn ends where the whole text does
                        uptos.append((c, t))
    before_text = dict(zip(befores, template.render([clean[c][:t] for c, t in befores], True), strict=True))
    upto_text = dict(zip(uptos, template.render([clean[c][: t + 1] for c, t in uptos], False), strict=True))
    results: list[Rendered | TemplateError] = []
    for c, conversation in enumerate(conversations):
        full = fulls[c]
        if isinstance(full, TemplateError):
            results.append(full)
            continue
        spans: list[tuple[int, int]] = []
        error: TemplateError | None = None
        for t, message in enumerate(conversation):
            if not is_trained(message):
                continue
            before, upto = before_text.get((c, t), ""), upto_text.get((c, t), full)
            if isinstance(before, TemplateError) or isinstance(upto, TemplateError):
                error = before if isinstance(before, TemplateError) else upto  # type: ignore[assignment]
                break
            if not (upto.startswith(before) and full.startswith(upto)):
                error = TemplateError(
                    f"the chat template does not render this conversation as a prefix of its continuation "
                    f"(at messages[{t}]); loss masking by assistant turn needs that")
                break
            spans.append((len(before), len(upto)))
        results.append(error or Rendered(full, tuple(spans), add_special_tokens=False))
    return results


# ---------------------------------------------------------------- prompts and their answers


@dataclass(frozen=True)
class Prompt:
    """What a row asks and the one answer it teaches: the text a model continues, rendered as in training.

    ``stop`` is the text that ends the answer in training (a chat template's end of turn,
    ``<|im_end|>``); a generation is cut there. Flat formats end with the EOS token.
    """

    text: str
    reference: str  # whitespace-trimmed
    add_special_tokens: bool = True
    stop: str | None = None


def prompts_of(rows: Sequence[dict[str, Any]], fmt: str, tokenizer: Any,
               chat_template: str | None = None) -> list[Prompt | TemplateError]:
    """Each row's prompt (what precedes the trained text) and its reference answer (the trained text).

    Chat rows end at their last trained assistant turn: the prompt is the conversation
    before it with the template's generation prompt. A ``text`` row has no prompt:
    ``ValueError``.
    """
    if fmt == "text":
        raise ValueError("a text dataset has no prompts: every token is trained")
    if fmt != "chat":
        prompts: list[Prompt | TemplateError] = []
        for row in rows:
            rendered = _render_flat(row, fmt, "")
            start = rendered.spans[0][0]
            prompts.append(Prompt(rendered.text[:start], rendered.text[start:].strip()))
        return prompts
    template = ChatTemplate(tokenizer, chat_template)
    clean = [[_template_message(m) for m in row["messages"]] for row in rows]
    last = [max(t for t, m in enumerate(row["messages"]) if is_trained(m)) for row in rows]
    befores = template.render([c[:t] for c, t in zip(clean, last)], True)
    uptos = template.render([c[:t + 1] for c, t in zip(clean, last)], False)
    out: list[Prompt | TemplateError] = []
    for conversation, t, before, upto in zip(clean, last, befores, uptos):
        if isinstance(before, TemplateError) or isinstance(upto, TemplateError):
            out.append(before if isinstance(before, TemplateError) else upto)  # type: ignore[arg-type]
            continue
        content = str(conversation[t].get("content") or "")
        turn = upto[len(before):] if upto.startswith(before) else ""
        # what the template puts after the answer (its end-of-turn marker) is where an answer stops
        stop = turn[len(content):].strip() if content and turn.startswith(content) else ""
        out.append(Prompt(before, content.strip(), add_special_tokens=False, stop=stop or None))
    return out


# ---------------------------------------------------------------- tokenising


class Tokens(Protocol):
    """One tokenised text: a ``tokenizers.Encoding`` or the same read from ``tokenizer(...)``."""

    @property
    def ids(self) -> list[int]: ...

    @property
    def offsets(self) -> list[tuple[int, int]]: ...

    def __len__(self) -> int: ...

    def char_to_token(self, char_pos: int) -> int | None: ...


@dataclass(frozen=True)
class _PlainTokens:
    ids: list[int]
    offsets: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.ids)

    def char_to_token(self, char_pos: int) -> int | None:
        return None  # no index: callers scan from the start


def tokenize_many(tokenizer: Any, texts: list[str], add_special_tokens: bool, *, sample: int = 4) -> list[Tokens]:
    """Tokenise ``texts`` exactly as ``tokenizer(text, return_offsets_mapping=True)`` does, much faster.

    The fast tokenizer's Rust ``encode_batch`` runs on every core and skips the
    per-row Python conversion. It is used only after a sample of the texts came out
    the same through ``tokenizer(...)``, which also sets the tokenizer's state
    (no truncation, no padding, special-token splitting) for the call.
    """
    if not texts:
        return []
    kwargs = dict(add_special_tokens=add_special_tokens, return_offsets_mapping=True, truncation=False, padding=False)
    head = tokenizer(texts[:sample], **kwargs)
    reference = [_PlainTokens(list(ids), [tuple(o) for o in offs])
                 for ids, offs in zip(head["input_ids"], head["offset_mapping"], strict=True)]
    if len(texts) <= sample:
        return list(reference)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            fast = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        except Exception:
            fast = None
        if fast is not None and all(f.ids == r.ids and list(f.offsets) == r.offsets
                                    for f, r in zip(fast, reference, strict=False)):  # the sample is a prefix
            return list(fast)
    enc = tokenizer(texts, **kwargs)
    return [_PlainTokens(list(ids), [tuple(o) for o in offs])
            for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def _span_test(spans: Sequence[tuple[int, int]]) -> Any:
    starts = [lo for lo, _ in spans]

    def inside(start: int) -> bool:
        k = bisect.bisect_right(starts, start) - 1
        return k >= 0 and start < spans[k][1]

    return inside


def labels_for(ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """A token keeps its id as label when it starts inside a span (spans sorted, disjoint); else -100."""
    inside = _span_test(spans)
    return [token if end > start and inside(start) else IGNORE_INDEX
            for token, (start, end) in zip(ids, offsets, strict=True)]


def first_label(tokens: Tokens, spans: Sequence[tuple[int, int]]) -> int:
    """The index of the first token :func:`labels_for` labels, or -1; without building the labels."""
    if not spans:
        return -1
    offsets = tokens.offsets
    # The token holding the first span's first character; tokens before it start before every span.
    begin = tokens.char_to_token(spans[0][0]) or 0
    inside = _span_test(spans)
    for index in range(begin, len(offsets)):
        start, end = offsets[index]
        if end > start and inside(start):
            return index
    return -1


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def trainable(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _encode_rendered(rendered: Sequence[Rendered], tokenizer: Any, max_seq_len: int) -> list[Encoded]:
    if not rendered:
        return []
    texts = [item.text for item in rendered]
    out = []
    for item, tokens in zip(rendered, tokenize_many(tokenizer, texts, rendered[0].add_special_tokens), strict=True):
        ids = list(tokens.ids)
        labels = labels_for(ids, list(tokens.offsets), item.spans)
        out.append(Encoded(ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len))
    return out


def encode_many(rows: Sequence[dict[str, Any]], fmt: str, tokenizer: Any, max_seq_len: int,
                chat_template: str | None = None) -> list[Encoded]:
    """:func:`encode` for many checked rows at once (one batched render and tokenise).

    Raises TemplateError, naming the row's position, when the chat template cannot render a row.
    """
    rendered: list[Rendered] = []
    for index, item in enumerate(render_many(rows, fmt, tokenizer, chat_template)):
        if isinstance(item, TemplateError):
            raise TemplateError(f"row {index + 1}: {item}")
        rendered.append(item)
    return _encode_rendered(rendered, tokenizer, max_seq_len)


def encode(row: dict[str, Any], fmt: str, tokenizer: Any, max_seq_len: int, chat_template: str | None = None) -> Encoded:
    """Tokenise one row; labels are the token ids inside trainable spans, else -100."""
    return _encode_rendered([render(row, fmt, tokenizer, chat_template)], tokenizer, max_seq_len)[0]
