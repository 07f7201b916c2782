"""A base model's tokenizer for ``loraq submit``, torch-free: ``tokenizer.json`` through ``tokenizers``.

transformers 5 imports torch even to load a tokenizer (2.4 s of the 3.0 s that
submitting 8 jobs took). :class:`FolderTokenizer` loads the same files the way
transformers 5.24 (``TokenizersBackend``) does, without it:

- ``tokenizer.json`` with ``tokenizers.Tokenizer.from_file``; truncation and padding off
  (transformers turns them off for every call loraq makes);
- the special tokens of ``tokenizer_config.json`` (``bos_token`` ... ``mask_token``,
  ``extra_special_tokens`` / ``additional_special_tokens``, ``added_tokens_decoder``): any
  not yet an added token of the backend is added, as transformers adds them at load, so
  their text in a row is one control token on both sides;
- BOS/EOS from ``tokenizer.json``'s post-processor (transformers ignores the config's
  ``add_bos_token`` / ``add_eos_token`` when a ``tokenizer.json`` exists);
- the chat template from ``chat_template.jinja``, ``chat_templates/``, or the config
  (:func:`.templates.folder_template`), rendered by :func:`.templates.render_chat` with
  the same Jinja environment, globals and filters as transformers.

It offers what loraq's encoder and the submit-time analysis call on a tokenizer
(``__call__`` with offsets, ``backend_tokenizer``, ``apply_chat_template`` without
tokenising, the special tokens). Tokenizer classes that rebuild their pipeline in
Python (some ``tokenizer_class`` values do, from the same vocabulary) could still encode
differently: the trainer encodes a sample of each job's rows both ways and fails the
job, saying so, on any difference (:func:`check_against`). ``LORAQ_SUBMIT_TOKENIZER=transformers``
makes submit load tokenizers through transformers instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TemplateError

#: Set to ``transformers`` to make submit load tokenizers through transformers (imports torch).
SUBMIT_TOKENIZER_ENV = "LORAQ_SUBMIT_TOKENIZER"
NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: Rows of a job the trainer encodes both ways (the first ones and some spread over the rest).
CHECK_ROWS = 8


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class FolderTokenizer:
    """A tokenizer folder loaded with ``tokenizers`` alone (see the module docstring)."""

    is_fast = True
    split_special_tokens = False

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import AddedToken, Tokenizer

        self.folder = Path(folder)
        self.name_or_path = str(folder)
        backend = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        backend.no_truncation()
        backend.no_padding()
        config_path = self.folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        legacy = self.folder / "special_tokens_map.json"
        if legacy.is_file():  # kept by older saves; the config wins where both name a token
            config = json.loads(legacy.read_text(encoding="utf-8")) | config
        self.special_tokens_map = {name: text for name in NAMED if (text := _content(config.get(name)))}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        self.extra_special_tokens = [t for t in (_content(v) for v in extra) if t]
        present = {token.content for token in backend.get_added_tokens_decoder().values()}
        to_add: list[Any] = []
        decoder = config.get("added_tokens_decoder") or {}
        for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):  # an added token's entry
            if isinstance(entry, dict) and entry.get("content") and entry["content"] not in present:
                fields = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
                to_add.append(AddedToken(entry["content"], **fields))
                present.add(entry["content"])
        for text in [*self.special_tokens_map.values(), *self.extra_special_tokens]:
            if text not in present:
                to_add.append(AddedToken(text, special=True))
                present.add(text)
        if to_add:
            backend.add_tokens(to_add)
        self.backend_tokenizer = backend
        self.chat_template: Any = _folder_template(self.folder)

    # ---- what loraq's encoder and the analysis use

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens_map.get("pad_token")

    @property
    def all_special_tokens(self) -> list[str]:
        seen: list[str] = []
        for token in [*self.special_tokens_map.values(), *self.extra_special_tokens]:
            if token not in seen:
                seen.append(token)
        return seen

    def get_vocab(self) -> dict[str, int]:
        return dict(self.backend_tokenizer.get_vocab(with_added_tokens=True))

    def __call__(self, texts: str | Sequence[str], *, add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False, truncation: bool = False, padding: bool = False,
                 **_: Any) -> dict[str, Any]:
        single = isinstance(texts, str)
        encodings = self.backend_tokenizer.encode_batch([texts] if single else list(texts),
                                                        add_special_tokens=add_special_tokens)
        out: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_offsets_mapping:
            out["offset_mapping"] = [list(e.offsets) for e in encodings]
        return {k: v[0] for k, v in out.items()} if single else out

    def apply_chat_template(self, conversation: Any, *, tokenize: bool = False, add_generation_prompt: bool = False,
                            chat_template: str | None = None, **_: Any) -> Any:
        from .templates import render_chat

        if tokenize:
            raise NotImplementedError("loraq renders chat templates to text and tokenises the text itself")
        template = chat_template or self.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise TemplateError("the tokenizer has no chat template")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        texts = render_chat(template, list(conversation) if batched else [conversation],
                            add_generation_prompt=add_generation_prompt, special_tokens=self.special_tokens_map)
        return texts if batched else texts[0]


def _folder_template(folder: Path) -> Any:
    from .templates import folder_template

    return folder_template(folder)


def disabled() -> bool:
    """Whether the operator asked submit to load tokenizers through transformers."""
    return os.environ.get(SUBMIT_TOKENIZER_ENV, "").lower() == "transformers"


_CACHED: dict[tuple[str, float], FolderTokenizer] = {}


def cached(folder: Path) -> FolderTokenizer:
    """One :class:`FolderTokenizer` per folder (and ``tokenizer.json`` mtime) for a process that checks many jobs."""
    key = (str(folder), (folder / "tokenizer.json").stat().st_mtime)
    if key not in _CACHED:
        _CACHED.clear()
        _CACHED[key] = FolderTokenizer(folder)
    return _CACHED[key]
def check_against(reference: Any, light: Any, rows: Sequence[dict[str, Any]], fmt: str, max_seq_len: int,
                  chat_template: str | None = None) -> str | None:
    """Where ``light`` (what submit used) encodes a sample of ``rows`` otherwise than ``reference`` (transformers,
    what trains); ``None`` when they agree on every token and label."""
    from .encoding import encode_many

    if not rows:
        return None
    picks = sorted(set(list(range(min(CHECK_ROWS // 2, len(rows))))
                       + [round(k * (len(rows) - 1) / max(1, CHECK_ROWS // 2)) for k in range(CHECK_ROWS // 2 + 1)]))
    sample = [rows[i] for i in picks]
    try:
        expected = encode_many(sample, fmt, reference, max_seq_len, chat_template)
    except TemplateError:
        return None  # the trainer reports the rows it cannot render itself
    try:
        got = encode_many(sample, fmt, light, max_seq_len, chat_template)
    except Exception as exc:  # noqa: BLE001 - any failure of the submit-side encoder is a mismatch to report
        return f"the submit-time tokenizer failed on the sample: {exc!r}"
    for index, want, have in zip(picks, expected, got):
        if want.input_ids != have.input_ids or want.labels != have.labels:
            at = next((k for k, (a, b) in enumerate(zip(want.input_ids, have.input_ids)) if a != b),
                      min(len(want.input_ids), len(have.input_ids)))
            what = "token ids" if want.input_ids != have.input_ids else "loss mask"
            return (f"row {index + 1}: {what} differ from token {at} (transformers: {want.input_ids[at:at + 4]}, "
                    f"submit: {have.input_ids[at:at + 4]}; {len(want.input_ids)} against {len(have.input_ids)} tokens)")
    return None
