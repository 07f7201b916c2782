"""The inspector on real PEFT adapters, and on each way an adapter folder can be broken."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import adapters as ad
from loraq import checkpoints
from loraq.errors import InspectionError
from loraq.inspect import Finding, Inspection, check_finite, inspect_adapter, quality_gate
from loraq.inspect.lora_config import LoraSettings, parse_config
from loraq.inspect.structure import MAX_PER_CODE
from loraq.sandbox import Roots

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# ---------------------------------------------------------------- fixtures (local: built once per session)


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ad.build_base(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="session")
def pristine(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT all-linear adapter with nonzero lora_B; tests corrupt copies of it."""
    return ad.peft_adapter(base, tmp_path_factory.mktemp("pristine") / "adapter")


@pytest.fixture
def adapter(pristine: Path, tmp_path: Path) -> Path:
    return ad.copy(pristine, tmp_path / "adapter")


def codes(result: Inspection, severity: str = "error") -> set[str]:
    return {f.code for f in result.findings if f.severity == severity}


def assert_only(result: Inspection, *expected: str) -> None:
    """Every expected code is an error, and every error is one of them."""
    assert codes(result) == set(expected), result.to_json()["findings"]


# ---------------------------------------------------------------- valid adapters pass


def test_peft_all_linear_adapter_passes(pristine: Path) -> None:
    result = inspect_adapter(pristine)
    assert result.passed, result.findings
    assert result.findings == []
    assert result.stats["r"] == 8 and result.stats["alpha"] == 16
    assert result.stats["n_modules"] == 14 and result.stats["n_tensors"] == 28
    assert set(result.stats["targets"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert result.stats["dtype"] == "F32"
    assert result.stats["bytes"] == (pristine / WEIGHTS).stat().st_size
    saved = json.loads((pristine / CONFIG).read_text())["target_modules"]
    assert set(result.stats["target_modules"]) == set(saved)  # PEFT writes a set: any order


def test_peft_explicit_targets_pass(base: Path, tmp_path: Path) -> None:
    folder = ad.peft_adapter(base, tmp_path / "qv", targets=["q_proj", "v_proj"], r=4, alpha=8)
    result = inspect_adapter(folder)
    assert result.passed, result.findings
    assert result.stats["n_modules"] == 4 and result.stats["targets"] == ["q_proj", "v_proj"]


def test_bf16_adapter_passes(base: Path, tmp_path: Path) -> None:
    folder = ad.peft_adapter(base, tmp_path / "bf16", bf16=True)
    result = inspect_adapter(folder)
    assert result.passed, result.findings
    assert result.stats["dtype"] == "BF16"
    assert 0 < result.stats["lora_b_max_abs"] < 1


@pytest.mark.parametrize("dtype", ["F16", "F64"])
def test_other_float_dtypes_pass(tmp_path: Path, dtype: str) -> None:
    result = inspect_adapter(ad.synthetic(tmp_path / "a", dtype=dtype))
    assert result.passed, result.findings
    assert result.stats["dtype"] == dtype


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_dora_embedding_and_rank_pattern_adapter_passes(base: Path, tmp_path: Path) -> None:
    folder = ad.peft_adapter(base, tmp_path / "dora", targets=["q_proj", "v_proj", "embed_tokens"], use_dora=True,
                             rank_pattern={"v_proj": 4})
    result = inspect_adapter(folder)
    assert result.passed, result.findings
    assert result.stats["n_modules"] == 5


def test_to_json_is_strict_json_even_for_nan(adapter: Path) -> None:
    ad.set_values(adapter / WEIGHTS, ad.lora_names(adapter / WEIGHTS, "lora_B")[0], lambda v: v.fill(math.nan))
    payload = inspect_adapter(adapter).to_json()
    assert payload["stats"]["lora_b_max_abs"] is None
    json.dumps(payload, allow_nan=False)


def test_to_json_is_the_documented_envelope(pristine: Path, tmp_path: Path) -> None:
    broken = ad.copy(pristine, tmp_path / "a")
    (broken / CONFIG).write_text("{")
    payload = inspect_adapter(broken).to_json()
    assert set(payload) == {"path", "passed", "findings", "stats", "serving"}
    assert payload["passed"] is False
    assert payload["serving"] == {}  # no verdicts on an adapter whose config cannot be read
    assert payload["findings"][0] == {"code": "bad_config", "severity": "error",
                                      "message": payload["findings"][0]["message"], "file": CONFIG}
    json.dumps(payload)  # serialisable as is


# ---------------------------------------------------------------- cannot inspect at all


def test_missing_folder_cannot_be_inspected(tmp_path: Path) -> None:
    with pytest.raises(InspectionError) as raised:
        inspect_adapter(tmp_path / "nope")
    assert raised.value.exit_code == 2 and "does not exist" in str(raised.value)


def test_a_file_is_not_an_adapter_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(InspectionError, match="not a folder"):
        inspect_adapter(tmp_path / "f")


def test_folder_outside_roots_cannot_be_inspected(adapter: Path, tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(InspectionError, match="outside the allowed roots"):
        inspect_adapter(adapter, roots=Roots.of([tmp_path / "root"]))
    assert inspect_adapter(adapter, roots=Roots.of([tmp_path])).passed


def test_data_without_base_is_a_usage_error(adapter: Path) -> None:
    with pytest.raises(InspectionError, match="needs a base"):
        inspect_adapter(adapter, data="rows.jsonl")


# ---------------------------------------------------------------- the folder and its files


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert_only(inspect_adapter(tmp_path / "a"), "empty_folder")


def test_missing_config(adapter: Path) -> None:
    (adapter / CONFIG).unlink()
    assert_only(inspect_adapter(adapter), "missing_config")


def test_broken_config_json(adapter: Path) -> None:
    (adapter / CONFIG).write_text('{"peft_type": "LORA", "r": 8,')
    assert_only(inspect_adapter(adapter), "bad_config")


def test_non_lora_config(adapter: Path) -> None:
    ad.edit_config(adapter, peft_type="PREFIX_TUNING")
    result = inspect_adapter(adapter)
    assert_only(result, "not_lora")
    assert "PREFIX_TUNING" in result.errors()[0].message


@pytest.mark.parametrize("field, value, words", [
    ("r", 0, "r must be a positive integer"),
    ("r", 8.5, "r must be a positive integer"),
    ("r", True, "r must be a positive integer"),
    ("lora_alpha", -1, "lora_alpha must be a positive number"),
    ("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
    ("target_modules", None, "target_modules is missing"),
    ("target_modules", [], "target_modules must be"),
    ("target_modules", r"(\w+\.)+q_proj", "repeats a group"),
    ("target_modules", r".*a.*b.*c.*d.*e", "5 unbounded repetitions"),
    ("rank_pattern", {"(q|v)+": 4}, "repeats a group"),
    ("modules_to_save", [f"m{i}" for i in range(300)], "at most 256"),
    ("lora_alpha", 10**400, "lora_alpha must be a positive number"),
    ("target_modules", "q_proj[", "not a valid regex"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern['q_proj'] must be a positive integer"),
])
def test_config_values_are_checked(adapter: Path, field: str, value: Any, words: str) -> None:
    ad.edit_config(adapter, **{field: value})
    result = inspect_adapter(adapter)
    assert codes(result) == {"bad_config"}
    assert any(words in f.message for f in result.errors()), result.findings


def test_oversized_config_is_not_parsed(adapter: Path) -> None:
    (adapter / CONFIG).write_text(" " * (2 << 20))
    assert_only(inspect_adapter(adapter), "oversized")


def test_zero_byte_weights(adapter: Path) -> None:
    (adapter / WEIGHTS).write_bytes(b"")
    assert_only(inspect_adapter(adapter), "zero_size")


def test_zero_byte_config(adapter: Path) -> None:
    (adapter / CONFIG).write_bytes(b"")
    assert "zero_size" in codes(inspect_adapter(adapter))


def test_pickle_only(adapter: Path) -> None:
    (adapter / WEIGHTS).rename(adapter / "adapter_model.bin")
    result = inspect_adapter(adapter)
    assert_only(result, "pickle_refused", "no_weights")
    assert any("adapter_model.bin" in f.message for f in result.findings if f.code == "no_weights")


class _Payload:
    """Unpickling this creates the marker file: the proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("keep_safetensors", [True, False])
def test_malicious_pickle_never_runs(adapter: Path, tmp_path: Path, keep_safetensors: bool) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is real: loading it does create the marker
    assert marker.exists()
    marker.unlink()
    if not keep_safetensors:
        (adapter / WEIGHTS).unlink()
    (adapter / "adapter_model.bin").write_bytes(payload)
    result = inspect_adapter(adapter)
    assert not marker.exists()
    refused = [f for f in result.findings if f.code == "pickle_refused"]
    assert refused and refused[0].file == "adapter_model.bin" and "never loads pickles" in refused[0].message
    assert not result.passed


def test_symlink_escape(adapter: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    (adapter / WEIGHTS).rename(outside)
    (adapter / WEIGHTS).symlink_to(outside)
    result = inspect_adapter(adapter)
    assert_only(result, "symlink_escape")
    assert result.errors()[0].file == WEIGHTS


def test_symlink_loop(adapter: Path) -> None:
    (adapter / "loop").symlink_to("loop")
    assert_only(inspect_adapter(adapter), "symlink_escape")


def test_symlink_inside_the_folder_is_fine(adapter: Path) -> None:
    (adapter / WEIGHTS).rename(adapter / "real.data")
    (adapter / WEIGHTS).symlink_to("real.data")
    assert inspect_adapter(adapter).passed


def test_fifo_as_weights_does_not_hang(adapter: Path) -> None:
    (adapter / WEIGHTS).unlink()
    os.mkfifo(adapter / WEIGHTS)
    assert_only(inspect_adapter(adapter), "not_regular_file")


def test_config_that_is_a_folder(adapter: Path) -> None:
    (adapter / CONFIG).unlink()
    (adapter / CONFIG).mkdir()
    assert_only(inspect_adapter(adapter), "not_regular_file")


def test_too_many_files(adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loraq.inspect.adapter

    monkeypatch.setattr(loraq.inspect.adapter, "MAX_FILES", 20)  # the real cap is 10,000
    for i in range(20):
        (adapter / f"f{i}").touch()
    result = inspect_adapter(adapter)
    assert "too_many_files" in codes(result)


def test_multiple_weights(adapter: Path) -> None:
    (adapter / "model.safetensors").write_bytes((adapter / WEIGHTS).read_bytes())
    assert_only(inspect_adapter(adapter), "multiple_weights")


# ---------------------------------------------------------------- hostile headers


def test_truncated_weights(adapter: Path) -> None:
    blob = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(blob[: len(blob) - 1000])
    result = inspect_adapter(adapter)
    assert_only(result, "truncated")
    assert "cut short by 1,000 bytes" in result.errors()[0].message


def test_header_length_beyond_file(adapter: Path) -> None:
    ad.rewrite(adapter / WEIGHTS, lambda h, d: ad.pack(h, d, length=10_000_000))
    assert_only(inspect_adapter(adapter), "truncated")


def test_header_length_over_cap_is_never_read(adapter: Path) -> None:
    ad.rewrite(adapter / WEIGHTS, lambda h, d: ad.pack(h, d, length=2**63))
    result = inspect_adapter(adapter)
    assert_only(result, "header_too_large")


@pytest.mark.parametrize("raw, code", [
    (b'{"a": ', "header_not_json"),
    (b"\xff\xfe{}", "header_not_json"),
    (b'{"a": NaN}', "header_not_json"),
    (b' {"__metadata__": {}}', "header_not_json"),
    (b"[" * 100_000, "header_not_json"),
    (b"[1, 2, 3]", "header_not_object"),
    (b'"just a string"', "header_not_object"),
])
def test_header_that_is_not_a_json_object(adapter: Path, raw: bytes, code: str) -> None:
    (adapter / WEIGHTS).write_bytes(ad.pack(raw))
    assert_only(inspect_adapter(adapter), code)


def test_header_duplicate_key(adapter: Path) -> None:
    def duplicate(header: dict[str, Any], data: bytes) -> bytes:
        text = json.dumps(header)
        name = ad.lora_names(adapter / WEIGHTS, "lora_B")[0]
        entry = json.dumps({name: header[name]})[1:-1]
        return ad.pack(text[:-1] + ", " + entry + "}", data)

    ad.rewrite(adapter / WEIGHTS, duplicate)
    assert_only(inspect_adapter(adapter), "header_duplicate_key")


def test_header_too_many_entries(adapter: Path) -> None:
    entry = '"t{}": {{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
    raw = "{" + ", ".join(entry.format(i) for i in range(200_001)) + "}"
    (adapter / WEIGHTS).write_bytes(ad.pack(raw))
    assert_only(inspect_adapter(adapter), "header_too_many_entries")


def _edit_entry(path: Path, part: str, edit: Any) -> str:
    name = ad.lora_names(path, part)[0]

    def change(header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        edit(header[name], header, data)
        return header, data

    ad.rewrite(path, change)
    return name


@pytest.mark.parametrize("edit, code", [
    (lambda e, h, d: e.update(dtype="F31"), "bad_dtype"),
    (lambda e, h, d: e.update(shape=[8, 65]), "span_mismatch"),
    (lambda e, h, d: e.update(shape=[8, -64]), "header_bad_entry"),
    (lambda e, h, d: e.update(shape=[8.0, 64]), "header_bad_entry"),
    (lambda e, h, d: e.pop("dtype"), "header_bad_entry"),
    (lambda e, h, d: e.update(extra=1), "header_bad_entry"),
    (lambda e, h, d: e.update(data_offsets=[10, 5]), "header_bad_entry"),
    (lambda e, h, d: e.update(data_offsets=[0]), "header_bad_entry"),
    (lambda e, h, d: h.update(__metadata__={"format": 1}), "bad_metadata"),
])
def test_header_bad_entries(adapter: Path, edit: Any, code: str) -> None:
    _edit_entry(adapter / WEIGHTS, "lora_A", edit)
    assert_only(inspect_adapter(adapter), code)


def _move(entry: dict[str, Any], to: int) -> None:
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [to, to + size]


def test_span_out_of_bounds(adapter: Path) -> None:
    data_len = len(ad.unpack((adapter / WEIGHTS).read_bytes())[1])
    _edit_entry(adapter / WEIGHTS, "lora_A", lambda e, h, d: _move(e, data_len + 4096))
    assert "span_out_of_bounds" in codes(inspect_adapter(adapter))


def test_overlapping_spans(adapter: Path) -> None:
    header, _ = ad.unpack((adapter / WEIGHTS).read_bytes())
    first = min((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"][0])
    _edit_entry(adapter / WEIGHTS, "lora_B", lambda e, h, d: _move(e, first["data_offsets"][0]))
    assert "span_overlap" in codes(inspect_adapter(adapter))


def test_holes_and_trailing_bytes(adapter: Path) -> None:
    ad.rewrite(adapter / WEIGHTS, lambda h, d: (h, d + b"\0" * 64))
    result = inspect_adapter(adapter)
    assert_only(result, "span_gap")
    assert "64 bytes after the last tensor" in result.errors()[0].message


def test_a_bloated_header_is_a_warning(adapter: Path) -> None:
    ad.rewrite(adapter / WEIGHTS, lambda h, d: ad.pack(json.dumps(h) + " " * (2 << 20), d))
    result = inspect_adapter(adapter)
    assert result.passed and codes(result, "warning") == {"oversized"}


def test_many_bad_entries_are_summarised(adapter: Path) -> None:
    def spoil(header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        for name, entry in header.items():
            if name != "__metadata__":
                entry["dtype"] = "Q7"
        return header, data

    ad.rewrite(adapter / WEIGHTS, spoil)
    result = inspect_adapter(adapter)
    bad = [f for f in result.findings if f.code == "bad_dtype"]
    assert len(bad) == MAX_PER_CODE + 1 and "23 more" in bad[-1].message


# ---------------------------------------------------------------- tensors and values


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_values(adapter: Path, value: float) -> None:
    name = ad.lora_names(adapter / WEIGHTS, "lora_A")[3]
    ad.set_values(adapter / WEIGHTS, name, lambda v: v.__setitem__(7, value))
    result = inspect_adapter(adapter)
    assert_only(result, "nonfinite")
    assert name in result.errors()[0].message


def test_nonfinite_bf16(base: Path, tmp_path: Path) -> None:
    folder = ad.peft_adapter(base, tmp_path / "bf16", bf16=True)
    name = ad.lora_names(folder / WEIGHTS, "lora_B")[0]

    def nan(header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        begin = header[name]["data_offsets"][0]
        return header, data[:begin] + b"\xc0\x7f" + data[begin + 2 :]  # bf16 NaN, little-endian

    ad.rewrite(folder / WEIGHTS, nan)
    assert_only(inspect_adapter(folder), "nonfinite")


def test_untrained_adapter_zero_b(base: Path, tmp_path: Path) -> None:
    folder = ad.peft_adapter(base, tmp_path / "fresh", perturb=False)
    result = inspect_adapter(folder)
    assert_only(result, "lora_b_zero")
    assert "peft#1402" in result.errors()[0].message


def test_some_zero_b_is_a_warning(adapter: Path) -> None:
    name = ad.lora_names(adapter / WEIGHTS, "lora_B")[0]
    ad.set_values(adapter / WEIGHTS, name, lambda v: v.fill(0.0))
    result = inspect_adapter(adapter)
    assert result.passed and codes(result, "warning") == {"lora_b_zero"}


def test_rank_mismatch_with_config(adapter: Path) -> None:
    ad.edit_config(adapter, r=16)
    result = inspect_adapter(adapter)
    assert_only(result, "rank_mismatch")
    assert "r=16" in result.errors()[0].message


def test_rank_pattern_is_honoured(base: Path, tmp_path: Path) -> None:
    folder = ad.peft_adapter(base, tmp_path / "rp", targets=["q_proj", "v_proj"], rank_pattern={"q_proj": 4})
    assert inspect_adapter(folder).passed
    ad.edit_config(folder, rank_pattern={})
    assert codes(inspect_adapter(folder)) == {"rank_mismatch"}


def test_a_and_b_disagree(adapter: Path) -> None:
    name = ad.lora_names(adapter / WEIGHTS, "lora_B")[0]

    def reshape(header: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        out, r = header[name]["shape"]
        header[name]["shape"] = [out * 2, r // 2]
        return header, data

    ad.rewrite(adapter / WEIGHTS, reshape)
    assert_only(inspect_adapter(adapter), "shape_mismatch")


def test_mixed_linear_and_embedding_keys(adapter: Path) -> None:
    name = ad.lora_names(adapter / WEIGHTS, "lora_B")[0]
    ad.rewrite(adapter / WEIGHTS, lambda h, d: ({k.replace(".lora_B.weight", ".lora_embedding_B") if k == name else k: v
                                                 for k, v in h.items()}, d))
    assert_only(inspect_adapter(adapter), "shape_mismatch")


def test_a_second_a_for_one_module(adapter: Path) -> None:
    name = ad.lora_names(adapter / WEIGHTS, "lora_A")[0]
    header, data = ad.unpack((adapter / WEIGHTS).read_bytes())
    tensors = {k: (e["dtype"], data[e["data_offsets"][0] : e["data_offsets"][1]], tuple(e["shape"]))
               for k, e in header.items() if k != "__metadata__"}
    tensors[name.replace(".lora_A.weight", ".lora_embedding_A")] = tensors[name]
    (adapter / WEIGHTS).write_bytes(ad.tensors_to_file(tensors))
    assert_only(inspect_adapter(adapter), "unexpected_key")


def _drop(path: Path, name: str) -> None:
    ad.rewrite(path, lambda h, d: ad.tensors_to_file({
        k: (e["dtype"], d[e["data_offsets"][0] : e["data_offsets"][1]], tuple(e["shape"]))
        for k, e in h.items() if k not in ("__metadata__", name)}))


def test_a_without_b(adapter: Path) -> None:
    _drop(adapter / WEIGHTS, ad.lora_names(adapter / WEIGHTS, "lora_B")[2])
    assert_only(inspect_adapter(adapter), "missing_lora_b")


def test_b_without_a(adapter: Path) -> None:
    _drop(adapter / WEIGHTS, ad.lora_names(adapter / WEIGHTS, "lora_A")[2])
    assert_only(inspect_adapter(adapter), "missing_lora_a")


def test_wrong_targets(adapter: Path) -> None:
    ad.edit_config(adapter, target_modules=["q_proj", "v_proj"])
    result = inspect_adapter(adapter)
    assert_only(result, "wrong_targets")
    assert "peft#2699" in result.errors()[0].message


def test_target_without_weights(tmp_path: Path) -> None:
    folder = ad.synthetic(tmp_path / "a", suffixes=["self_attn.q_proj"])
    ad.edit_config(folder, target_modules=["q_proj", "v_proj"])
    result = inspect_adapter(folder)
    assert_only(result, "missing_targets")
    assert "'v_proj'" in result.errors()[0].message


def test_regex_targets(tmp_path: Path) -> None:
    folder = ad.synthetic(tmp_path / "a")
    ad.edit_config(folder, target_modules=r".*\.self_attn\.(q|v)_proj")
    assert inspect_adapter(folder).passed
    ad.edit_config(folder, target_modules=r".*\.q_proj")
    assert codes(inspect_adapter(folder)) == {"wrong_targets"}


def test_no_lora_keys(adapter: Path) -> None:
    (adapter / WEIGHTS).write_bytes(ad.tensors_to_file({}))
    assert_only(inspect_adapter(adapter), "no_lora_keys")


def test_zero3_shard_saves_empty_tensors(adapter: Path) -> None:
    def empty(header: dict[str, Any], data: bytes) -> bytes:
        return ad.tensors_to_file({k: (e["dtype"], b"", (0,)) for k, e in header.items() if k != "__metadata__"})

    ad.rewrite(adapter / WEIGHTS, empty)
    result = inspect_adapter(adapter)
    assert_only(result, "empty_tensor")
    assert "ZeRO-3" in result.errors()[0].message


def test_integer_lora_weights(tmp_path: Path) -> None:
    folder = ad.synthetic(tmp_path / "a", dtype="I32")
    assert "bad_dtype" in codes(inspect_adapter(folder))


def test_adapter_name_in_keys(adapter: Path) -> None:
    ad.rewrite(adapter / WEIGHTS,
               lambda h, d: ({k.replace(".lora_A.", ".lora_A.default."): v for k, v in h.items()}, d))
    result = inspect_adapter(adapter)
    assert {"unexpected_key", "missing_lora_a"} <= codes(result)


def test_modules_to_save_bloat_is_a_warning(base: Path, tmp_path: Path) -> None:
    folder = ad.peft_adapter(base, tmp_path / "mts", targets=["q_proj"], modules_to_save=["lm_head"])
    result = inspect_adapter(folder)
    assert result.passed, result.findings
    assert codes(result, "warning") == {"modules_to_save_bloat"}
    config = json.loads((base / "config.json").read_text())
    assert result.stats["modules_to_save_bytes"] == config["vocab_size"] * config["hidden_size"] * 4  # fp32 lm_head


# ---------------------------------------------------------------- check_finite (every checkpoint)


def test_check_finite_finds_nan_in_a_checkpoint(adapter: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-50"
    checkpoint.mkdir()
    (checkpoint / WEIGHTS).write_bytes((adapter / WEIGHTS).read_bytes())
    (checkpoint / "optimizer.pt").write_bytes(b"not read")
    assert check_finite(checkpoint / WEIGHTS) is None
    assert checkpoints.check_weights(checkpoint) is None
    name = ad.lora_names(checkpoint / WEIGHTS, "lora_B")[5]
    ad.set_values(checkpoint / WEIGHTS, name, lambda v: v.__setitem__(0, math.nan))
    problem = check_finite(checkpoint / WEIGHTS)
    assert problem is not None and "NaN or Inf" in problem and name in problem and "\n" not in problem
    assert checkpoints.check_weights(checkpoint) == problem


def test_check_finite_reports_structure(tmp_path: Path) -> None:
    assert "cannot be read" in str(check_finite(tmp_path / "missing.safetensors"))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert "0 bytes" in str(check_finite(tmp_path / "empty.safetensors"))
    cut = ad.pack({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    (tmp_path / "cut.safetensors").write_bytes(cut)
    assert "cut short" in str(check_finite(tmp_path / "cut.safetensors"))


# ---------------------------------------------------------------- the quality gate


def test_quality_gate() -> None:
    assert quality_gate(2.0, 1.5, 0.0) is None
    assert quality_gate(2.0, 2.0, 0.0) is None  # not worse than the base passes the default gate
    assert quality_gate(2.0, 1.5, 0.5) is None
    assert quality_gate(None, 1.5, 0.5) is None and quality_gate(2.0, None, 0.5) is None
    worse = quality_gate(2.0, 2.1, 0.0)
    assert isinstance(worse, Finding) and worse.code == "quality_gate" and worse.severity == "error"
    assert "no better" in worse.message
    short = quality_gate(2.0, 1.8, 0.5)
    assert short is not None and "0.2000" in short.message and "0.5000" in short.message
    for bad in [(math.nan, 1.0, 0.0), (2.0, math.inf, 0.0), (2.0, 1.0, math.nan)]:
        finding = quality_gate(*bad)
        assert finding is not None and "not finite" in finding.message


# ---------------------------------------------------------------- PEFT parity and the torch-free path


def test_target_matching_agrees_with_peft(base: Path) -> None:
    """LoraSettings.targets_module decides exactly what peft's own matcher decides."""
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        names = [n for n, _ in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).named_modules()]
    configs = [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": ["model.layers.0.self_attn.q_proj", "mlp.up_proj"]},
        {"target_modules": r".*\.layers\.1\..*_proj"},
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
        {"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["model.layers.0.self_attn.k_proj"]},
        {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]},
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*layers\.0\..*"},
        {"target_modules": r".*_proj", "exclude_modules": ["o_proj", "mlp.down_proj"]},
        {"target_modules": ["self_attn"]},
    ]
    for extra in configs:
        ours, problems = parse_config(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **extra}).encode())
        assert ours is not None, problems
        theirs = LoraConfig(r=8, lora_alpha=16, **extra)
        for name in names:
            assert ours.targets_module(name) == bool(check_target_module_exists(theirs, name)), (extra, name)


def test_rank_pattern_lookup_matches_peft() -> None:
    from peft.utils.other import get_pattern_key

    patterns = [
        {"layers.1.self_attn.q_proj": 2, "v_proj": 4},
        {"q_proj": 2, r".*\.layers\.1\..*": 4, "v_proj": 6},  # the first key that matches wins
        {r"layers\.[01]\.self_attn\.q_proj": 3, "model.layers.0.self_attn.q_proj": 5, "proj": 7},
    ]
    for pattern in patterns:
        settings = LoraSettings(r=8, alpha=16, dropout=0, targets=("q_proj",), rank_pattern=pattern)
        for layer, suffix in [(1, "q_proj"), (0, "q_proj"), (0, "v_proj"), (1, "v_proj"), (1, "k_proj")]:
            name = f"model.layers.{layer}.self_attn.{suffix}"
            key = get_pattern_key(list(pattern), name)
            assert settings.rank_of(name) == pattern.get(key, 8), (pattern, name)


def test_inspection_never_imports_torch(adapter: Path) -> None:
    """The supervisor runs the inspection before publishing, and never imports torch."""
    code = ("import sys; from loraq.inspect import inspect_adapter, check_finite; "
            f"r = inspect_adapter({str(adapter)!r}); assert r.passed, r.findings; "
            f"assert check_finite(__import__('pathlib').Path({str(adapter / WEIGHTS)!r})) is None; "
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- with the base model (and data)


@pytest.mark.slow
def test_with_base_passes(pristine: Path, base: Path) -> None:
    result = inspect_adapter(pristine, base=str(base))
    assert result.passed, result.findings
    assert result.stats["max_logit_change"] > 0 and result.stats["base"] == str(base)


@pytest.mark.slow
def test_with_base_and_data_passes_and_gates(base: Path, tmp_path: Path) -> None:
    import random

    from loraq.demo import sql_rows, write_jsonl

    rows = sql_rows(48, random.Random(3))
    dataset = write_jsonl(tmp_path / "eval.jsonl", rows[:16])
    folder = ad.trained_adapter(base, tmp_path / "trained", rows[16:])
    result = inspect_adapter(folder, base=str(base), data=str(dataset), max_seq_len=128)
    assert result.passed, result.findings
    assert result.stats["eval_loss"] < result.stats["base_eval_loss"]
    assert result.stats["eval_rows"] == 16
    strict = inspect_adapter(folder, base=str(base), data=str(dataset), min_eval_loss_drop=100.0)
    assert codes(strict) == {"quality_gate"}


@pytest.mark.slow
def test_adapter_for_another_width(base: Path, tmp_path: Path) -> None:
    other = ad.build_llama(tmp_path / "wide", hidden=128, intermediate=256)
    folder = ad.peft_adapter(other, tmp_path / "wide-adapter")
    assert inspect_adapter(folder).passed  # on its own it is a fine adapter
    result = inspect_adapter(folder, base=str(base))
    assert_only(result, "base_shape_mismatch")
    assert "made for a model of another width" in result.errors()[0].message
    assert "max_logit_change" not in result.stats  # a misfit adapter is never loaded


@pytest.mark.slow
def test_names_and_shapes_come_from_the_config_alone(pristine: Path, base: Path, tmp_path: Path) -> None:
    """The shape check reads the base's config, not its weights; loading them comes only after."""
    broken_base = ad.copy(base, tmp_path / "base")
    (broken_base / "model.safetensors").write_bytes(b"not weights")
    wrong = ad.copy(pristine, tmp_path / "wrong")
    ad.edit_config(wrong, r=4)
    assert_only(inspect_adapter(wrong, base=str(broken_base)), "rank_mismatch")
    with pytest.raises(InspectionError, match="cannot load it"):
        inspect_adapter(pristine, base=str(broken_base))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_dora_embedding_adapter_loads_on_the_base(base: Path, tmp_path: Path) -> None:
    folder = ad.peft_adapter(base, tmp_path / "dora", targets=["q_proj", "embed_tokens"], use_dora=True)
    result = inspect_adapter(folder, base=str(base))
    assert result.passed, result.findings
    assert result.stats["max_logit_change"] > 0


@pytest.mark.slow
def test_a_broken_adapter_is_not_loaded(base: Path, tmp_path: Path) -> None:
    folder = ad.peft_adapter(base, tmp_path / "fresh", perturb=False)
    result = inspect_adapter(folder, base=str(base))
    assert_only(result, "lora_b_zero")
    assert "max_logit_change" not in result.stats


@pytest.mark.slow
def test_adapter_for_another_architecture(base: Path, tmp_path: Path) -> None:
    folder = ad.synthetic(tmp_path / "gpt2ish", suffixes=["self_attn.q_proj"])
    ad.rewrite(folder / WEIGHTS,
               lambda h, d: ({k.replace("model.layers.", "transformer.h."): v for k, v in h.items()}, d))
    result = inspect_adapter(folder, base=str(base))
    assert codes(result) == {"base_mismatch", "missing_targets"}


@pytest.mark.slow
def test_no_effect_on_the_base(base: Path, tmp_path: Path) -> None:
    folder = ad.peft_adapter(base, tmp_path / "tiny-alpha", targets=["q_proj"], alpha=1e-30)
    assert inspect_adapter(folder).passed
    assert_only(inspect_adapter(folder, base=str(base)), "no_effect")


def test_base_and_data_are_checked_before_the_folder(pristine: Path, base: Path, tmp_path: Path) -> None:
    broken = ad.copy(pristine, tmp_path / "broken")
    (broken / CONFIG).unlink()  # a finding, but "cannot inspect" comes first
    for folder in (pristine, broken):
        with pytest.raises(InspectionError, match="outside the allowed roots"):
            inspect_adapter(folder, roots=Roots.of([folder]), base=str(base))
        with pytest.raises(InspectionError, match="does not exist"):
            inspect_adapter(folder, base=str(base / "nope"))
        with pytest.raises(InspectionError, match="eval dataset .* does not exist"):
            inspect_adapter(folder, base=str(base), data=str(tmp_path / "nope.jsonl"))
        with pytest.raises(InspectionError, match="outside the allowed roots"):
            inspect_adapter(folder, roots=Roots.of([folder, base]), base=str(base), data=str(tmp_path / "x.jsonl"))
