"""``loraq export``: a merged model checked against base + adapter, and a GGUF LoRA whose tensors are PEFT's.

The adapters are real: one trained by ``loraq run`` on the tiny base and published, and
PEFT-built ones for the GGUF scaling and refusal rules. The llama.cpp round trip on the
real base is in test_llamacpp.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapters
from conftest import LORAQ, TINY_DEFAULTS, write_queue
from loraq import api, fsutil
from loraq.errors import ExportError
from loraq.workspace import Home
from test_faults import Faults

gguf = pytest.importorskip("gguf", reason="the export extra (pip install 'loraq[export]') is not installed")


def loraq(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORAQ, "--home", str(cwd / ".loraq"), *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


@pytest.fixture(scope="module")
def project(tiny_model: Path, demo_datasets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose queue trained and published the adapter 'sql' (all-linear) on the tiny base."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_model, root / "models" / "tiny")
    (root / "data").mkdir()
    shutil.copy(demo_datasets["sql"], root / "data" / "sql.jsonl")
    queue = write_queue(root, TINY_DEFAULTS + """
jobs:
  - name: sql
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    lora: {r: 8, alpha: 16, target_modules: all-linear}
""")
    for command in (["submit", str(queue)], ["run", "-q"]):
        result = loraq(*command, cwd=root)
        assert result.returncode == 0, result.stdout + result.stderr
    return root


def logits(model: Any, tokenizer: Any, text: str) -> Any:
    import torch

    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0]


# ---------------------------------------------------------------- merged


def test_merged_export_is_sharded_checked_and_equals_base_plus_adapter(project: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = loraq("export", "sql", "--to", "merged", "out/merged", "--shard-size", "300KB", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    folder = project / "out" / "merged"
    assert out["path"] == str(folder) and out["dtype"] == "fp32"
    check = out["check"]
    assert check["source"] == str(project / "data" / "sql.jsonl")  # the adapter's own rows, from its manifest
    assert check["rows"] == 4 and check["max_abs_diff"] <= check["tolerance"]
    assert check["max_abs_diff"] <= check["adapter_effect"] / 2
    files = {p.name for p in folder.iterdir()}
    assert out["shards"] > 1 and "model.safetensors.index.json" in files
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "loraq-export.json"} <= files
    assert not any(n.startswith(".loraq-tmp") for n in (p.name for p in (project / "out").iterdir()))

    # An independent check: the folder loads as a plain model, with the base's chat template,
    # and answers as base + adapter does.
    base_dir = project / "models" / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.chat_template == AutoTokenizer.from_pretrained(base_dir).chat_template
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                          project / ".loraq" / "adapters" / "sql").eval()
    text = "SELECT name FROM users WHERE the adapter was merged"
    got, want = logits(merged, tokenizer, text), logits(reference, tokenizer, text)
    assert float((got - want).abs().max()) < 1e-4
    with reference.disable_adapter():
        assert not torch.allclose(logits(reference, tokenizer, text), want)  # the adapter does change it


def test_merged_bf16_is_saved_in_bf16_within_its_stated_tolerance(project: Path) -> None:
    result = loraq("export", "sql", "--to", "merged", "out/bf16", "--dtype", "bf16", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    check = json.loads(result.stdout)["check"]
    assert (check["atol"], check["rtol"]) == (5e-2, 5e-2)
    assert check["max_abs_diff"] <= check["tolerance"]
    header, _ = adapters.unpack((project / "out" / "bf16" / "model.safetensors").read_bytes())
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_merged_export_refusals_and_usage(project: Path, tmp_path: Path) -> None:
    (project / "out").mkdir(exist_ok=True)
    taken = project / "out" / "taken"
    taken.mkdir(exist_ok=True)
    (taken / "keep.txt").write_text("mine")
    cases = {
        ("export", "sql", "--to", "merged", "out/taken"): (1, "already exists"),
        ("export", "sql", "--to", "merged", ".loraq/adapters/merged"): (1, "never export into an adapter folder"),
        ("export", "nothing", "--to", "merged", "out/x"): (1, "no published adapter of that name"),
        ("export", "sql", "--to", "onnx", "out/x"): (2, "--to: 'onnx' is not one of merged, gguf"),
        ("export", "sql", "--to", "merged"): (2, "requires 2 arguments"),
        ("export", "sql", "--to", "merged", "out/x", "--dtype", "int8"): (2, "--dtype: 'int8'"),
        ("export", "sql", "--to", "gguf", "out/x.gguf", "--dtype", "bf16"): (2, "apply to --to merged"),
    }
    for args, (code, message) in cases.items():
        result = loraq(*args, cwd=project)
        assert (result.returncode, message in result.stderr) == (code, True), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (taken / "keep.txt").read_text() == "mine"
    outside = shutil.copytree(project / ".loraq" / "adapters" / "sql", tmp_path / "outside")
    result = loraq("export", str(outside), "--to", "gguf", "out/x.gguf", cwd=project)
    assert result.returncode == 1 and "outside the allowed roots" in result.stderr
    assert not (project / "out" / "x").exists() and not (project / "out" / "x.gguf").exists()

    quantised = project / "models" / "quantised"
    shutil.copytree(project / "models" / "tiny", quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    result = loraq("export", "sql", "--to", "merged", "out/q", "--base", "./models/quantised", cwd=project)
    assert result.returncode == 1 and "is bitsandbytes: merging into a quantised base" in result.stderr
    assert not (project / "out" / "q").exists()


@pytest.mark.parametrize("failing", ["fsync", "rename"])
def test_a_merged_export_cut_short_leaves_nothing(project: Path, failing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    home = Home(project / ".loraq")
    target = project / "cut" / f"merged-{failing}"

    class FailAt(Faults):
        def _tick(self, what: str) -> None:
            if what == failing:
                super()._tick(what)

    with fsutil.use_ops(FailAt(1)), pytest.raises(OSError, match="injected"):
        api.export(home, "sql", to="merged", dest=target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no hidden half-built folder either


# ---------------------------------------------------------------- GGUF


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {key: reader.get_field(key).contents() for key in
              ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def test_gguf_export_of_a_published_adapter(project: Path) -> None:
    result = loraq("export", "sql", "--to", "gguf", "out/sql.gguf", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["architecture"], out["modules"], out["tensors"]) == ("llama", 14, 28)  # 2 layers x 7 linear
    fields, tensors = read_gguf(project / "out" / "sql.gguf")
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": pytest.approx(16.0)}
    assert tensors["blk.0.attn_q.weight.lora_a"].size == 8 * 64
    assert tensors["blk.1.ffn_down.weight.lora_b"].size == 64 * 8
    text = loraq("export", "sql", "--to", "gguf", "out/sql.gguf", "--force", cwd=project).stdout
    assert "llama-server -m BASE.gguf --lora" in text and "ADAPTER" in text


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: how llama.cpp's converter stores q/k weights' rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("settings", [
    {"r": 8, "alpha": 16},
    {"r": 16, "alpha": 8, "use_rslora": True},
    {"r": 8, "alpha": 16, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"o_proj": 64, "v_proj": 2}},
], ids=["plain", "rslora", "patterns"])
def test_gguf_tensors_apply_exactly_peft_delta(tiny_model: Path, tmp_path: Path, settings: dict[str, Any]) -> None:
    """alpha / r · lora_b · lora_a from the file is PEFT's delta, q/k rows permuted as the base GGUF's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = adapters.peft_adapter(tiny_model, tmp_path / "a", targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                                   **settings)
    result = subprocess.run([LORAQ, "--home", str(tmp_path / "h"), "--allow-root", str(tiny_model), "export", "a",
                             "--to", "gguf", "a.gguf", "--base", str(tiny_model)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    fields, tensors = read_gguf(tmp_path / "a.gguf")
    alpha = float(fields["adapter.lora.alpha"])
    config = json.loads((tiny_model / "config.json").read_text())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), folder)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    for layer in range(config["num_hidden_layers"]):
        attention = peft_model.base_model.model.model.layers[layer].self_attn
        for module, short in names.items():
            want = getattr(attention, module).get_delta_weight("default").detach().numpy()
            if module == "q_proj":
                want = hf_permute(want, config["num_attention_heads"])
            elif module == "k_proj":
                want = hf_permute(want, config["num_key_value_heads"])
            out_features, in_features = want.shape
            a = tensors[f"blk.{layer}.{short}.weight.lora_a"]
            b = tensors[f"blk.{layer}.{short}.weight.lora_b"]
            r = a.size // in_features
            got = alpha / r * b.reshape(out_features, r) @ a.reshape(r, in_features)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"layer {layer} {module}")


@pytest.fixture(scope="module")
def refused(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf-refused")
    shutil.copytree(tiny_model, root / "tiny")
    tied = root / "tied"
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps(json.loads((tiny_model / "config.json").read_text())
                                                 | {"tie_word_embeddings": True}))
    for name, settings in {"dora": dict(targets=["q_proj"], use_dora=True),
                           "saved": dict(targets=["q_proj"], modules_to_save=["lm_head"]),
                           "embed": dict(targets=["q_proj", "embed_tokens"]),
                           "head": dict(targets=["q_proj", "lm_head"])}.items():
        adapters.peft_adapter(root / "tiny", root / name, **settings)  # type: ignore[arg-type]
    return root


@pytest.mark.parametrize("name, base, why", [
    ("dora", "./tiny", "use_dora is set: DoRA"),
    ("saved", "./tiny", "modules_to_save is set"),
    ("embed", "./tiny", "LoRA on embed_tokens: llama.cpp cannot apply LoRA to embed_tokens"),
    ("head", "./tied", "this base ties lm_head to embed_tokens: llama.cpp crashes on it"),
])
def test_gguf_export_refuses_what_llamacpp_cannot_apply(refused: Path, name: str, base: str, why: str) -> None:
    result = loraq("export", name, "--to", "gguf", f"{name}.gguf", "--base", base, cwd=refused)
    assert result.returncode == 1, result.stderr
    assert "llama.cpp cannot apply this adapter" in result.stderr and why in result.stderr
    assert not (refused / f"{name}.gguf").exists()
    assert not [p for p in refused.iterdir() if p.name.startswith(".loraq-tmp")]


def test_a_gguf_export_cut_short_keeps_the_old_file_or_the_new_one(project: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    home = Home(project / ".loraq")
    target = project / "cut-gguf" / "sql.gguf"
    target.parent.mkdir()
    target.write_bytes(b"GGUF, the old file")  # an earlier export: what --force may replace
    written = None
    for k in range(1, 10):
        faults = Faults(k)
        with fsutil.use_ops(faults):
            try:
                written = api.export(home, "sql", to="gguf", dest=target, force=True)
            except OSError:
                pass
        content = target.read_bytes()
        assert content == b"GGUF, the old file" or content.startswith(b"GGUF\x03"), k
        assert sorted(p.name for p in target.parent.iterdir()) == ["sql.gguf"], k
        if faults.injected is None:
            break
    assert written is not None and target.read_bytes().startswith(b"GGUF\x03")
    with pytest.raises(ExportError, match="already exists"):
        api.export(home, "sql", to="gguf", dest=target)


def test_gguf_reads_the_adapter_with_the_inspectors_bounded_reader(tmp_path: Path) -> None:
    """Every float dtype as float32 (bf16 widened by hand); a lying header or a non-float tensor is refused."""
    from loraq.export.gguf import read_safetensors

    values = np.array([[1.5, -2.0, 0.25], [3.0, 0.0, -0.5]], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # exact: these values fit in bf16
    path = tmp_path / "w.safetensors"
    path.write_bytes(adapters.tensors_to_file({"f32": ("F32", values, (2, 3)), "f16": ("F16", values.astype("<f2"), (2, 3)),
                                               "f64": ("F64", values.astype("<f8"), (3, 2)), "bf16": ("BF16", bf16, (2, 3))}))
    got = read_safetensors(path)
    assert {k: (a.dtype, a.shape) for k, a in got.items()} == {
        "f32": (np.float32, (2, 3)), "f16": (np.float32, (2, 3)), "f64": (np.float32, (3, 2)), "bf16": (np.float32, (2, 3))}
    for name in ("f32", "f16", "bf16"):
        assert np.array_equal(got[name], values), name
    assert np.array_equal(got["f64"], values.reshape(3, 2))

    path.write_bytes(adapters.pack({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8,
                                   length=1 << 40))
    with pytest.raises(ExportError, match="over the .*-byte cap"):
        read_safetensors(path)
    path.write_bytes(adapters.tensors_to_file({"x": ("I32", np.zeros(2, dtype="<i4"), (2,))}))
    with pytest.raises(ExportError, match="dtype I32; expected a float type"):
        read_safetensors(path)
    path.write_bytes(adapters.tensors_to_file({"x": ("F32", np.zeros(2, dtype="<f4"), (2,))}) + b"\0" * 4)
    with pytest.raises(ExportError, match="belong to no tensor"):
        read_safetensors(path)
