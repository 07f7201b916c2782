"""The torch-free submit: tokenizer.json through ``tokenizers``, chat templates through loraq's Jinja environment,
token for token what transformers gives, and a trainer that refuses a job whose submit-time count was wrong.

(That ``submit`` and ``--dry-run`` import no torch is in tests/test_imports.py.)
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from loraq import data, demo
from loraq.data.templates import BUILTIN, render_chat
from loraq.data.tokenizer import FolderTokenizer, check_against

ROOT = Path(__file__).resolve().parents[1]


def transformers_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def rows_by_format() -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(5)
    out = {}
    for _, (_, make) in demo.DATASETS.items():
        rows = make(40, rng)
        out[data.detect_format(rows[0])] = rows
    out["text"] = [{"text": r["prompt"] + r["completion"]} for r in out["prompt_completion"]]
    tricky = [  # special-token text inside a row, non-ASCII, spaces at the edges, an empty system turn
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": " héllo <|im_end|> <|eos|> 日本 "},
                      {"role": "assistant", "content": "ok <|end|>\n\n", "weight": 1}]},
        {"messages": [{"role": "user", "content": "a\tb", "name": None}, {"role": "assistant", "content": "ü"}]},
    ]
    out["chat"] = out["chat"] + tricky
    return out


def assert_same_encoding(folder: Path, rows: dict[str, list[dict[str, Any]]], chat_template: str | None = None) -> None:
    reference, light = transformers_tokenizer(folder), FolderTokenizer(folder)
    assert light.special_tokens_map == reference.special_tokens_map
    assert light.all_special_tokens == reference.all_special_tokens
    for fmt, subset in rows.items():
        if fmt == "chat" and not (chat_template or reference.chat_template):
            continue
        want = data.encode_many(subset, fmt, reference, 512, chat_template)
        got = data.encode_many(subset, fmt, light, 512, chat_template)
        assert [e.input_ids for e in got] == [e.input_ids for e in want], fmt
        assert [e.labels for e in got] == [e.labels for e in want], fmt
        assert check_against(reference, light, subset, fmt, 512, chat_template) is None


def test_the_demo_tokenizer_encodes_every_format_as_transformers_does(tiny_model: Path) -> None:
    assert_same_encoding(tiny_model, rows_by_format())


def test_special_tokens_from_the_config_and_a_bos_post_processor_are_honoured(tiny_model: Path, tmp_path: Path) -> None:
    """A named token the config adds (not yet in tokenizer.json) is one control token on both sides; a
    tokenizer.json whose post-processor adds BOS adds it on both sides (flat formats tokenise with specials)."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["mask_token"] = "<|mask|>"
    config["extra_special_tokens"] = [*config.get("extra_special_tokens", []), "<|tool_call|>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    doc = json.loads((folder / "tokenizer.json").read_text())
    doc["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
                                                                     {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [1], "tokens": ["<|bos|>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    rows = rows_by_format()
    rows["prompt_completion"].append({"prompt": "mask <|mask|> call <|tool_call|>", "completion": " done"})
    assert_same_encoding(folder, rows)
    light = FolderTokenizer(folder)
    ids = light("x <|mask|>", add_special_tokens=True)["input_ids"]
    assert ids[0] == 1 and light.get_vocab()["<|mask|>"] == ids[-1]


TEMPLATES = {
    "tojson, namespace, loop controls": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}<{{ m.role }} {{ ns.n }}>{{ m.content | tojson }}{% if m.tool_calls is defined %}"
        "{{ m.tool_calls | tojson(indent=2) }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant>"
        "{% endif %}{{ eos_token }}"),
    "generation tag, whitespace control, reasoning": (
        "{%- for m in messages %}\n  {%- if m.role == 'assistant' %}\n    {% generation %}[{{ m.reasoning_content "
        "| default('') }}|{{ m.thinking | default('') }}]{{ m.content }}{% endgeneration %}\n  {%- else %}\n    "
        "{{ bos_token }}{{ m.content | trim }}\n  {%- endif %}\n{%- endfor %}"),
    "raise_exception": "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
                       "{{ messages | length }}",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_templates_render_as_transformers_renders_them(name: str, tiny_model: Path) -> None:
    reference = transformers_tokenizer(tiny_model)
    conversations = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ünï \"quoted\" <b>"},
         {"role": "assistant", "content": "yes", "reasoning": "because", "tool_calls": [{"name": "f", "args": {"é": 1}}]}],
        [{"role": "user", "content": "  spaced  ", "name": None}, {"role": "assistant", "content": "ok"}],
    ]
    template = TEMPLATES[name]
    for generation in (False, True):
        try:
            want = reference.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation,
                                                 chat_template=template)
        except Exception as exc:  # the template refuses: so must ours, with the same message
            with pytest.raises(Exception, match=str(exc)):
                render_chat(template, conversations, add_generation_prompt=generation,
                            special_tokens=reference.special_tokens_map)
            continue
        got = render_chat(template, conversations, add_generation_prompt=generation,
                          special_tokens=reference.special_tokens_map)
        assert got == want


@pytest.mark.real
def test_the_real_models_tokenizer_and_template_encode_every_real_task_as_transformers_does(real_model: Any) -> None:
    folder = real_model.folder
    import realdata

    rows = rows_by_format()
    for task in realdata.all_tasks():
        rows[task.format] = rows.get(task.format, []) + task.train + task.eval
    assert_same_encoding(folder, rows)
    assert_same_encoding(folder, {"chat": rows["chat"]}, chat_template=BUILTIN["chatml"])


@pytest.mark.slow
def test_the_trainer_refuses_a_job_whose_submit_time_encoding_differs_and_says_why(tiny_model: Path,
                                                                                   tmp_path: Path) -> None:
    """The trainer encodes a sample of the rows with the submit-time tokenizer too: here the base's tokenizer.json
    was swapped for another one after submit (as a tokenizer class that rebuilds its pipeline would differ)."""
    from loraq.errors import FailureKind, TrainingError
    from loraq.protocol import JobInput
    from loraq.queue.spec import JobSpec
    from loraq.train.prepare import prepare

    other = demo.build_model(tmp_path / "other", seed=1, pretrain_steps=1)
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base, ignore=shutil.ignore_patterns("*.safetensors"))
    rows = rows_by_format()["prompt_completion"]
    dataset = demo.write_jsonl(tmp_path / "pc.jsonl", rows)
    spec = JobSpec.model_validate({"name": "j", "base_model": str(base), "dataset": {"path": str(dataset)},
                                   "training": {"max_seq_len": 64}})
    job = JobInput(spec=spec.model_dump(mode="json"), base_model=str(base), dataset_path=str(dataset),
                   submit_tokenizer="tokenizers")
    reference = transformers_tokenizer(base)
    assert prepare(job, reference).n_train > 0  # the same files: the same encoding
    shutil.copy(other / "tokenizer.json", base / "tokenizer.json")  # what submit read is no longer what trains
    with pytest.raises(TrainingError) as info:
        prepare(job, reference)
    assert info.value.kind is FailureKind.BASE_MODEL
    message = str(info.value)
    assert "encodes otherwise at submit" in message and "LORAQ_SUBMIT_TOKENIZER=transformers" in message
    assert "row " in message and "differ from token" in message
    # A job submitted through transformers is not compared.
    assert prepare(JobInput(**{**job.__dict__, "submit_tokenizer": "transformers"}), reference).n_train > 0
