"""Serving verdicts (vLLM, LoRAX, llama.cpp / Ollama) on real PEFT adapters, and the queue's serving gate.

Every rule is met by an adapter built to pass it and one built to fail it, judged through
``loraq inspect --json``; the gate refuses at submit (through the CLI) and again at publish
(the worker, in-process, with a scripted trainer that leaves an adapter the spec did not promise).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import adapters
from conftest import LORAQ, TINY_DEFAULTS, write_queue
from loraq import report
from loraq.protocol import Done, TrainRequest, TrainResult
from loraq.queue.store import COMPLETED, FAILED, NewJob, Store
from loraq.workspace import Home
from test_faults import resolved_spec
from test_worker import ScriptedExecutor, run, started, trains


def loraq(*args: str, cwd: Path, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["--home", str(home)] if home else ["--home", str(cwd / ".loraq")]
    return subprocess.run([LORAQ, *prefix, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def base_like(tiny: Path, folder: Path, **changes: Any) -> Path:
    """A folder holding only a config.json: the tiny base's, with ``changes``. The verdicts read nothing else."""
    folder.mkdir(parents=True)
    config = json.loads((tiny / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def for_base(adapter: Path, base: Path | str) -> Path:
    adapters.edit_config(adapter, base_model_name_or_path=str(base))
    return adapter


@pytest.fixture(scope="module")
def built(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of adapters, each made to pass or fail a rule, with the bases they name."""
    root = tmp_path_factory.mktemp("serving")
    shutil.copytree(tiny_model, root / "tiny")
    tiny = root / "tiny"
    tied = base_like(tiny, root / "tied", tie_word_embeddings=True)
    neox = base_like(tiny, root / "neox", model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    make = {
        "plain": dict(targets=["q_proj", "v_proj"], r=8),
        "rank24": dict(targets="all-linear", r=24, use_rslora=True),
        "rank1024": dict(targets=["q_proj"], r=1024),
        "dora": dict(targets=["q_proj", "v_proj"], r=8, use_dora=True),
        "saved-head": dict(targets=["q_proj"], r=8, modules_to_save=["lm_head"]),
        "lm-head": dict(targets=["q_proj", "lm_head"], r=8),
        "embed": dict(targets=["q_proj", "embed_tokens"], r=8),
    }
    for name, settings in make.items():
        adapters.peft_adapter(tiny, root / name, **settings)  # type: ignore[arg-type]
    adapters.copy(root / "lm-head", root / "lm-head-tied")
    for_base(root / "lm-head-tied", tied)
    adapters.copy(root / "plain", root / "plain-neox")
    for_base(root / "plain-neox", neox)
    adapters.copy(root / "plain", root / "plain-nobase")
    for_base(root / "plain-nobase", root / "no-such-base")
    # the bases are named inside the adapters' configs: read only inside the roots, so the home allows this folder
    (root / ".loraq").mkdir()
    (root / ".loraq" / "config.yaml").write_text(f"allow_roots: [{json.dumps(str(root))}]\n")
    return root


def verdicts(root: Path, name: str) -> dict[str, Any]:
    result = loraq("inspect", name, "--json", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)["serving"]


def test_an_adapter_every_engine_serves(built: Path) -> None:
    serving = verdicts(built, "plain")
    assert {engine: v["servable"] for engine, v in serving.items()} == {"vllm": True, "lorax": True, "llamacpp": True}
    assert serving["vllm"]["flags"] == "--max-lora-rank 8"
    assert all(v["why"] == [] for v in serving.values())
    text = loraq("inspect", "plain", cwd=built).stdout
    assert "vLLM                yes (--max-lora-rank 8)" in text
    assert "llama.cpp / Ollama  yes" in text


def test_vllm_needs_the_next_allowed_max_lora_rank_and_refuses_one_above_512(built: Path) -> None:
    serving = verdicts(built, "rank24")
    assert serving["vllm"]["servable"] is True
    assert serving["vllm"]["flags"] == "--max-lora-rank 32"
    assert any("default --max-lora-rank is 16" in note for note in serving["vllm"]["notes"])
    big = verdicts(built, "rank1024")["vllm"]
    assert big["servable"] is False
    assert big["fields"] == ["lora.r"]
    assert "rank 1024 is above 512" in big["why"][0] and "set lora.r to 512 or less" in big["why"][0]


def test_dora_is_refused_by_vllm_and_llamacpp(built: Path) -> None:
    serving = verdicts(built, "dora")
    assert serving["vllm"]["servable"] is False and "DoRA" in serving["vllm"]["why"][0]
    assert serving["llamacpp"]["servable"] is False and "use_dora" in serving["llamacpp"]["why"][0]
    assert serving["lorax"]["servable"] is True


def test_modules_to_save_is_refused_by_vllm_and_llamacpp(built: Path) -> None:
    serving = verdicts(built, "saved-head")
    assert serving["vllm"]["servable"] is False and "modules_to_save" in serving["vllm"]["why"][0]
    assert serving["llamacpp"]["servable"] is False and "modules_to_save" in serving["llamacpp"]["why"][0]


def test_llamacpp_refuses_lm_head_and_embed_tokens_and_says_what_to_change(built: Path) -> None:
    head = verdicts(built, "lm-head")
    assert head["llamacpp"]["servable"] is False
    assert head["llamacpp"]["fields"] == ["lora.target_modules"]
    assert "remove lm_head from lora.target_modules" in " ".join(head["llamacpp"]["why"])
    assert head["lorax"]["servable"] is True  # LoRAX lists lm_head for llama
    tied = verdicts(built, "lm-head-tied")["llamacpp"]
    assert "ties lm_head to embed_tokens" in " ".join(tied["why"])
    embed = verdicts(built, "embed")["llamacpp"]
    assert embed["servable"] is False and "embed_tokens" in " ".join(embed["why"])


def test_lorax_judges_target_modules_per_architecture(built: Path) -> None:
    embed = verdicts(built, "embed")["lorax"]
    assert embed["servable"] is False
    assert embed["fields"] == ["lora.target_modules"]
    assert "LoRAX ignores LoRA on embed_tokens for llama" in embed["why"][0]
    neox = verdicts(built, "plain-neox")
    assert neox["lorax"]["servable"] is False and "gpt_neox" in neox["lorax"]["why"][0]
    assert neox["llamacpp"]["servable"] is False and "GPTNeoXForCausalLM" in neox["llamacpp"]["why"][0]
    assert neox["vllm"]["servable"] is True


def test_without_a_readable_base_the_architecture_rules_say_they_cannot_tell(built: Path) -> None:
    serving = verdicts(built, "plain-nobase")
    assert serving["vllm"]["servable"] is True
    assert serving["lorax"]["servable"] is None and "--base" in serving["lorax"]["why"][0]
    assert serving["llamacpp"]["servable"] is None
    with_base = loraq("inspect", "plain-nobase", "--base", "./tiny", "--json", cwd=built)
    assert json.loads(with_base.stdout)["serving"]["lorax"]["servable"] is True


# ---------------------------------------------------------------- the gate at submit


def test_submit_refuses_jobs_the_required_engines_would_not_serve(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + """
serving: [vllm, ollama]
jobs:
  - {name: fine, dataset: ./data/sql.jsonl}
  - {name: too-wide, dataset: ./data/sql.jsonl, lora: {r: 1024}}
  - {name: head, dataset: ./data/sql.jsonl, lora: {target_modules: [q_proj, lm_head]}}
""")
    result = loraq("submit", str(queue), cwd=workdir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert f"{queue}: job 'too-wide': lora.r: serving: vLLM will not serve it: rank 1024 is above 512" in lines[0]
    assert f"{queue}: job 'head': lora.target_modules: serving: llama.cpp / Ollama will not serve it" in lines[1]
    assert "remove lm_head from lora.target_modules" in lines[1]
    assert json.loads(loraq("status", "--json", cwd=workdir).stdout)["jobs"] == []


def test_submit_refuses_lora_variants_an_engine_cannot_apply(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + """
serving: [vllm]
jobs:
  - {name: rs, dataset: ./data/sql.jsonl, lora: {use_rslora: true}}
  - {name: dora, dataset: ./data/sql.jsonl, lora: {use_dora: true}}
  - {name: whole, dataset: ./data/sql.jsonl, lora: {modules_to_save: [lm_head]}}
""", name="variants.yaml")
    result = loraq("submit", str(queue), cwd=workdir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert f"{queue}: job 'dora': lora.use_dora: serving: vLLM will not serve it" in lines[0]
    assert f"{queue}: job 'whole': lora.modules_to_save: serving: vLLM will not serve it" in lines[1]
    assert "lm_head" in lines[1]
    llamacpp = write_queue(workdir, TINY_DEFAULTS + """
serving: [llamacpp]
jobs:
  - {name: dora, dataset: ./data/sql.jsonl, lora: {use_dora: true}}
""", name="variants-gguf.yaml")
    result = loraq("submit", str(llamacpp), cwd=workdir)
    assert result.returncode == 1 and "job 'dora': lora.use_dora: serving: llama.cpp / Ollama" in result.stderr
    assert json.loads(loraq("status", "--json", cwd=workdir).stdout)["jobs"] == []


def test_submit_gate_for_lorax_and_a_queue_that_passes_it(workdir: Path) -> None:
    refused = write_queue(workdir, TINY_DEFAULTS + """
serving: [lorax]
jobs:
  - {name: embed, dataset: ./data/sql.jsonl, lora: {target_modules: [q_proj, embed_tokens]}}
""", name="refused.yaml")
    result = loraq("submit", str(refused), cwd=workdir)
    assert result.returncode == 1 and "job 'embed': lora.target_modules: serving: LoRAX" in result.stderr
    fine = write_queue(workdir, TINY_DEFAULTS + """
serving: [vllm, lorax, llamacpp]
jobs:
  - {name: fine, dataset: ./data/sql.jsonl, lora: {target_modules: all-linear, r: 24}}
""", name="fine.yaml")
    result = loraq("submit", str(fine), cwd=workdir)
    assert result.returncode == 0, result.stderr
    shown = json.loads(loraq("show", "fine", "--json", cwd=workdir).stdout)
    assert shown["job"]["spec"]["serving"] == ["vllm", "lorax", "llamacpp"]


def test_an_unknown_engine_is_a_spec_error(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + "serving: [tgi]\njobs:\n  - {name: a, dataset: ./data/sql.jsonl}\n")
    result = loraq("submit", str(queue), cwd=workdir)
    assert result.returncode == 1
    assert "serving" in result.stderr and "'tgi' is not a serving engine" in result.stderr


# ---------------------------------------------------------------- the gate at publish


def enqueue_gated(home: Home, name: str, serving: list[str]) -> Store:
    store = Store.open(home.db_path)
    store.enqueue([NewJob(name=name, spec=resolved_spec(name) | {"serving": serving}, base_key="tiny", max_retries=0)],
                  settings={"retry_backoff_s": 0})
    return store


def leaves(make: Any) -> Any:
    """A scripted trainer that trains 2 steps and leaves ``make(staging)`` as its adapter."""

    def script(request: TrainRequest) -> list[Any]:
        staging = Path(request.staging_dir)
        return [started(2, request.resume_from), lambda: make(staging),
                Done(result=TrainResult(staging=str(staging), steps=2, max_steps=2, train_loss=1.5, eval_loss=1.0,
                                        base_eval_loss=2.0, n_train=10, n_eval=2))]

    return script


def test_publish_refuses_an_adapter_the_required_engine_would_not_serve(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.ensure()
    store = enqueue_gated(home, "wide", ["vllm"])
    run(home, store, ScriptedExecutor(leaves(lambda staging: adapters.synthetic(staging, r=1024))), max_jobs=1)
    job = store.job("wide")
    assert job.status == FAILED and job.error_kind == "inspection"
    assert "[serving] vLLM will not serve it: rank 1024 is above 512" in job.error
    assert not home.adapter_dir("wide").exists()


def test_publish_passes_a_servable_adapter_and_the_report_shows_the_verdicts(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.ensure()
    store = enqueue_gated(home, "plain", ["vllm"])
    run(home, store, ScriptedExecutor(trains()), max_jobs=1)
    assert store.job("plain").status == COMPLETED
    inspection = json.loads((home.adapter_dir("plain") / "inspection.json").read_text())
    assert inspection["serving"]["vllm"]["servable"] is True
    built = report.build(store, home)
    assert built["jobs"][0]["serving"]["vllm"]["flags"] == "--max-lora-rank 8"
    md = report.to_markdown(built)
    assert "vLLM yes (--max-lora-rank 8)" in md
    # the base (/models/tiny) is not on this machine: the other engines cannot be judged, and say so
    assert "LoRAX: cannot tell" in md
    assert "serving: vLLM yes" in report.to_html(built)


def test_a_base_named_inside_the_adapter_and_outside_the_roots_is_not_read(built: Path, tmp_path: Path) -> None:
    """The adapter folder is the operator's (the command line); the base its config names is not."""
    result = loraq("inspect", str(built / "plain"), "--json", cwd=tmp_path, home=tmp_path / "home")
    assert result.returncode == 0, result.stdout + result.stderr
    serving = json.loads(result.stdout)["serving"]
    assert serving["lorax"]["servable"] is None and "architecture is unknown" in serving["lorax"]["why"][0]
    named = loraq("inspect", str(built / "plain"), "--base", str(built / "tiny"), "--json", cwd=tmp_path,
                  home=tmp_path / "home")
    assert json.loads(named.stdout)["serving"]["lorax"]["servable"] is True
