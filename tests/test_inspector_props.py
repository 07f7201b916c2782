"""Property tests: whatever bytes sit in adapter_model.safetensors, the inspector answers, fast, and never
passes a file the reference loader would refuse.

Every example starts from one valid adapter and breaks it: random bytes, a lying
length, edited header bytes, edited header JSON, cut-off files, edited values.
The oracle is safetensors' own loader (Rust): a file that the inspector passes
must load there with every value finite, and one it refuses to load must not
pass. Torch-free, like the supervisor that runs these checks.
"""

from __future__ import annotations

import json
import os
import struct
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import adapters as ad
from loraq.inspect import check_finite, inspect_adapter

WEIGHTS = "adapter_model.safetensors"
#: LORAQ_PROPS_EXAMPLES=5000 for a deeper hunt; the default keeps the suite fast.
PROPS = settings(max_examples=int(os.environ.get("LORAQ_PROPS_EXAMPLES", "150")), deadline=timedelta(seconds=2),
                 database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """An adapter folder and the bytes of its valid, small weights file (F32 and F16 tensors)."""
    folder = ad.synthetic(tmp_path_factory.mktemp("props") / "adapter", r=2, layers=1)
    header, data = ad.unpack((folder / WEIGHTS).read_bytes())
    # Store the v_proj tensors as F16, so both widths are exercised.
    tensors: dict[str, Any] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        values = np.frombuffer(data[begin:end], dtype=np.float32)
        if "v_proj" in name:
            tensors[name] = ("F16", values.astype(np.float16), tuple(entry["shape"]))
        else:
            tensors[name] = ("F32", values, tuple(entry["shape"]))
    blob = ad.tensors_to_file(tensors)
    (folder / WEIGHTS).write_bytes(blob)
    assert inspect_adapter(folder).passed
    return folder, blob


def reference_verdict(path: Path) -> bool:
    """Whether safetensors' own loader reads every tensor, and every float value is finite."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            for key in f.keys():  # noqa: SIM118 -- safe_open is not a mapping
                values = f.get_tensor(key)
                if values.dtype.kind == "f" and not np.isfinite(values).all():
                    return False
    except Exception:  # noqa: BLE001 -- any refusal by the reference counts as a refusal
        return False
    return True


def judge(folder: Path, blob: bytes) -> tuple[bool, str | None]:
    """Write ``blob`` as the weights, inspect it, and run check_finite; neither may raise."""
    (folder / WEIGHTS).write_bytes(blob)
    result = inspect_adapter(folder)
    # Every finding is one a report can show: a known severity, a code, one line of message.
    assert all(f.severity in ("error", "warning", "info") and f.code.isidentifier() for f in result.findings)
    assert all(f.message and "\n" not in f.message for f in result.findings)
    return result.passed, check_finite(folder / WEIGHTS)


def test_the_untouched_file_passes(valid: tuple[Path, bytes]) -> None:
    folder, blob = valid
    assert judge(folder, blob) == (True, None)
    assert reference_verdict(folder / WEIGHTS)


@PROPS
@given(blob=st.binary(max_size=4096))
def test_random_bytes(valid: tuple[Path, bytes], blob: bytes) -> None:
    passed, problem = judge(valid[0], blob)
    assert not passed and problem is not None


@PROPS
@given(header=st.binary(max_size=512), claimed=st.integers(0, 2**64 - 1))
def test_random_header_behind_any_length(valid: tuple[Path, bytes], header: bytes, claimed: int) -> None:
    passed, problem = judge(valid[0], struct.pack("<Q", claimed) + header)
    assert not passed and problem is not None


@PROPS
@given(claimed=st.integers(0, 2**64 - 1))
def test_a_lying_header_length(valid: tuple[Path, bytes], claimed: int) -> None:
    folder, blob = valid
    assume(claimed != struct.unpack("<Q", blob[:8])[0])
    passed, problem = judge(folder, struct.pack("<Q", claimed) + blob[8:])
    assert not passed and problem is not None


@PROPS
@given(data=st.data())
def test_truncation_anywhere(valid: tuple[Path, bytes], data: st.DataObject) -> None:
    folder, blob = valid
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    passed, problem = judge(folder, blob[:cut])
    assert not passed and problem is not None


@PROPS
@given(data=st.data())
def test_header_byte_edits(valid: tuple[Path, bytes], data: st.DataObject) -> None:
    folder, blob = valid
    n = struct.unpack("<Q", blob[:8])[0]
    edits = data.draw(st.lists(st.tuples(st.integers(8, 8 + n - 1), st.integers(0, 255)), min_size=1, max_size=4))
    mutated = bytearray(blob)
    for index, value in edits:
        mutated[index] = value
    passed, problem = judge(folder, bytes(mutated))
    reference = reference_verdict(folder / WEIGHTS)
    if passed:
        assert reference, f"the inspector passed a file the reference loader refuses: {edits}"
    if not reference:
        assert not passed and problem is not None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@PROPS
@given(data=st.data())
def test_header_json_edits(valid: tuple[Path, bytes], data: st.DataObject) -> None:
    """Replace, drop or add one field of one entry (or of the whole header), then re-serialise."""
    folder, blob = valid
    header, region = ad.unpack(blob)
    names = sorted(header)
    target = data.draw(st.sampled_from([*names, None]), label="entry")
    entry = header if target is None else header[target]
    action = data.draw(st.sampled_from(["replace", "drop", "add", "nudge"]), label="action")
    if isinstance(entry, dict) and action in ("replace", "drop", "nudge") and entry:
        key = data.draw(st.sampled_from(sorted(entry)), label="key")
        if action == "drop":
            del entry[key]
        elif action == "nudge" and isinstance(entry[key], list):  # small changes to shapes and offsets
            entry[key] = [v + data.draw(st.integers(-9, 9)) if isinstance(v, int) else v for v in entry[key]]
        else:
            entry[key] = data.draw(JSON, label="value")
    elif isinstance(entry, dict):
        entry[data.draw(st.text(max_size=8), label="new key")] = data.draw(JSON, label="value")
    mutated = ad.pack(json.dumps(header), region)
    passed, problem = judge(folder, mutated)
    reference = reference_verdict(folder / WEIGHTS)
    if passed:
        assert reference, f"the inspector passed a file the reference loader refuses: {json.dumps(header)[:300]}"
    if not reference:
        assert not passed and problem is not None


@PROPS
@given(data=st.data())
def test_value_byte_edits(valid: tuple[Path, bytes], data: st.DataObject) -> None:
    """Edited values pass exactly when every value is still finite."""
    folder, blob = valid
    start = 8 + struct.unpack("<Q", blob[:8])[0]
    edits = data.draw(st.lists(st.tuples(st.integers(start, len(blob) - 1), st.integers(0, 255)),
                               min_size=1, max_size=6))
    mutated = bytearray(blob)
    for index, value in edits:
        mutated[index] = value
    passed, problem = judge(folder, bytes(mutated))
    finite = reference_verdict(folder / WEIGHTS)
    assert passed == finite
    assert (problem is None) == finite


CONFIG_FIELDS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                 "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
                 "use_dora", "lora_bias", "target_parameters"]
REGEXISH = st.text(alphabet="._*+?()[]{}|\\^$qvkpro0123456789", max_size=24)
CONFIG_VALUES = JSON | REGEXISH | st.lists(REGEXISH, max_size=4) | st.dictionaries(REGEXISH, JSON, max_size=3)


@pytest.fixture(scope="module")
def config_folder(valid: tuple[Path, bytes], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ad.copy(valid[0], tmp_path_factory.mktemp("props-config") / "adapter")


@PROPS
@given(data=st.data())
def test_hostile_configs(config_folder: Path, data: st.DataObject) -> None:
    """Any values in adapter_config.json: an answer, never an exception; a passing config keeps r and targets."""
    cfg = ad.config(r=2, targets=["q_proj", "v_proj"])
    for _ in range(data.draw(st.integers(1, 3), label="fields")):
        cfg[data.draw(st.sampled_from(CONFIG_FIELDS), label="field")] = data.draw(CONFIG_VALUES, label="value")
    (config_folder / "adapter_config.json").write_text(json.dumps(cfg))
    result = inspect_adapter(config_folder)
    assert result.passed == (not result.errors())
    if result.passed:
        assert result.stats["r"] == 2 == cfg["r"]
        assert str(cfg["peft_type"]).upper() == "LORA"
