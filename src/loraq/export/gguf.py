"""A PEFT LoRA adapter as a GGUF LoRA file, which llama.cpp loads (``--lora``) and Ollama uses (``ADAPTER``).

Torch-free: numpy and the ``gguf`` package (the ``export`` extra). It writes what llama.cpp's
own ``convert_lora_to_gguf.py`` writes and what ``src/llama-adapter.cpp`` accepts (llama.cpp
as vendored by llama-cpp-python 0.3.36, gguf-py 0.19.0):

* metadata: ``general.architecture`` = the base's llama.cpp architecture ("llama", "qwen2",
  ...; the loader refuses a mismatch), ``general.type`` = "adapter", ``adapter.type`` =
  "lora", ``adapter.lora.alpha`` (FLOAT32; the loader reads it with gguf_get_val_f32).
* tensors: for each adapted module, ``<gguf base tensor name>.lora_a`` and ``.lora_b``, the
  base name from ``gguf.get_tensor_name_map(arch, n_layers)``, e.g.
  model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight.lora_a / .lora_b. lora_a is PEFT's
  lora_A (numpy shape (r, in), ggml ne = [in, r]); lora_b is PEFT's lora_B ((out, r),
  ne = [r, out]); neither is transposed. float32.
* llama.cpp applies scale = adapter.lora.alpha / r per tensor (r = lora_b's ne[0]); alpha 0
  means scale 1. PEFT's scaling is lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), per module
  with rank_pattern / alpha_pattern. The file's alpha is the default module's scaling * r
  (rsLoRA: lora_alpha * sqrt(r)); a module whose scaling differs has the ratio folded into
  its lora_b.
* the Llama family (llama, mistral) stores q/k weights with their rows permuted for
  llama.cpp's RoPE layout (convert_hf_to_gguf's LlamaModel.permute, n_head for q, n_kv_head
  for k): lora_b of q_proj / k_proj gets the same row permutation; lora_a is untouched.
  Without it the adapted outputs diverge.

Refused, with the reason (:class:`~loraq.errors.ExportError`), exactly where the llama.cpp
serving verdict (:func:`loraq.inspect.serving.llamacpp_verdict`) says no: DoRA
(lora_magnitude_vector), modules_to_save, trainable tokens, LoRA on embed_tokens or lm_head,
bias training, and any option whose effect llama.cpp cannot reproduce. (On a base with tied
embeddings, such as SmolLM2, llama.cpp 0.3.36 kills the process: an embed_tokens LoRA written
as the converter does, token_embd.weight.lora_a = A.T, fails GGML_ASSERT(ggml_can_mul_mat) at
the first decode, because the output projection reuses token_embd; an lm_head LoRA
(output.weight.*) loads and then segfaults at the first decode.)

Every pair is checked against the base's own weight, from its safetensors headers: lora_A
must be (r, in) and lora_B (out, r) of the base's (out, in) weight, as PEFT and the merged
export require; an adapter made for another model is refused, never written as "checked".

The file is written beside its target, read back and compared with what was meant to be
written (names, shapes, every value, the metadata), fsynced, and renamed into place: it
appears whole and checked, or not at all. What it replaces must be an earlier GGUF export
(:mod:`.target`), checked again just before the rename.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import fsutil
from ..errors import ExportError, UsageError
from ..inspect import safetensors, serving
from ..sandbox import Roots, open_regular, path_errors_as, read_fd
from . import target as target_mod

PREFIX = "base_model.model."
_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight)$")


@dataclass(frozen=True)
class Plan:
    """What a GGUF LoRA file will hold."""

    architecture: str  # llama.cpp's name: "llama", "qwen2", ...
    alpha: float
    tensors: list[tuple[str, np.ndarray]]  # gguf name -> float32 array


@dataclass(frozen=True)
class GgufResult:
    path: str
    bytes: int
    architecture: str
    alpha: float
    n_tensors: int
    modules: int


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise UsageError("loraq export --to gguf needs the gguf package: pip install 'loraq[export]'") from exc
    return gguf


def _open(path: Path, roots: Roots | None) -> tuple[int, os.stat_result]:
    """A checked descriptor: inside ``roots`` where given, a regular file (not a symlink) always."""
    with path_errors_as(ExportError):
        if roots is not None:
            return roots.open_file(path, what="adapter file")
        fd = open_regular(path, what="adapter file")
    return fd, os.fstat(fd)


def _read(path: Path, roots: Roots | None) -> bytes:
    """A file's bytes from a checked descriptor (see :func:`_open`)."""
    fd, st = _open(path, roots)
    try:
        return read_fd(fd, st.st_size)
    finally:
        os.close(fd)


def read_safetensors(path: Path, roots: Roots | None = None) -> dict[str, np.ndarray]:
    """Every tensor as a float32 array, read with the inspector's bounded reader (:mod:`loraq.inspect.safetensors`).

    The header is checked before any value is read (a hostile length, a duplicate key or
    a span outside the file is refused); every tensor must be a float type.
    """
    fd, st = _open(path, roots)
    try:
        header, defects = safetensors.read_header(fd, st.st_size)
        if header is None or defects:
            raise ExportError(f"{path}: not a readable safetensors file: {defects[0].message}")
        for t in header.tensors:
            if t.dtype not in safetensors.FLOAT_DTYPES:
                raise ExportError(f"{path}: tensor {t.name[:200]} has dtype {t.dtype}; expected a float type")
        arrays, defects = safetensors.read_arrays(fd, header)
        if defects:
            raise ExportError(f"{path}: {defects[0].message}")
        return arrays
    except OSError as exc:
        raise ExportError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern key that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute applied to lora_b's rows (the output side)."""
    rows = b.shape[0]
    if rows % (2 * n_head):
        raise ExportError(f"lora_B has {rows} rows, not a multiple of 2 x {n_head} heads: not made for this base")
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def plan_export(adapter_dir: str | os.PathLike[str], base_config: dict[str, Any],
                base_shapes: dict[str, tuple[int, ...]] | None, *, roots: Roots | None = None) -> Plan:
    """Check the adapter against llama.cpp's rules and the base's weights, and compute what to write.

    ``base_shapes``: ``tensor name -> shape`` of the base's weights
    (:func:`loraq.inspect.warm_start.base_shapes`); ``None`` (unreadable) is refused, as an
    adapter that cannot be checked against its base. ``roots``: where the adapter's files must be.

    Raises:
        ExportError: llama.cpp cannot apply the adapter faithfully (the message says why
            and what to change), or the adapter does not fit the base.
    """
    gguf = _gguf()
    adapter_dir = Path(adapter_dir)
    cfg_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise ExportError(f"{adapter_dir}: no adapter_config.json")
    if not weights_file.is_file():
        raise ExportError(f"{adapter_dir}: no adapter_model.safetensors (pickle .bin adapters are not read)")
    try:
        cfg = json.loads(_read(cfg_file, roots))
    except ValueError:
        raise ExportError(f"{cfg_file}: not valid JSON") from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{cfg_file}: not a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ExportError(f"peft_type is {cfg.get('peft_type')}; only LoRA adapters can be written as GGUF LoRA")
    tensors = read_safetensors(weights_file, roots)

    verdict = serving.llamacpp_verdict(
        serving.facts_from_adapter(cfg, [(n, tuple(a.shape)) for n, a in tensors.items()], base_config))
    if not verdict.servable:
        raise ExportError("llama.cpp cannot apply this adapter: " + "; ".join(r.message for r in verdict.reasons))
    if base_shapes is None:
        raise ExportError("the base model's safetensors weights cannot be read: the adapter cannot be checked "
                          "against them; give --base the folder of the model it was trained on")

    hf_arch = base_config["architectures"][0]
    arch_name, permute_qk = serving.GGUF_ARCHITECTURES[hf_arch]
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    n_layers = int(base_config["num_hidden_layers"])
    n_head = int(base_config["num_attention_heads"])
    n_kv_head = int(base_config.get("num_key_value_heads") or n_head)
    tensor_map = gguf.get_tensor_name_map(arch, n_layers)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        m = _TENSOR.match(name.removeprefix(PREFIX))
        if not name.startswith(PREFIX) or m is None:
            raise ExportError(f"{name} is not a lora_A / lora_B weight; llama.cpp applies only LoRA pairs")
        pairs.setdefault(m["module"], {})["A" if m["part"].startswith("lora_A") else "B"] = arr
    if not pairs:
        raise ExportError(f"{weights_file}: no LoRA tensors")

    r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora"))

    def peft_scaling(r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if rslora else alpha / r

    gguf_alpha = peft_scaling(r0, alpha0) * r0  # rsLoRA: alpha * sqrt(r)
    if gguf_alpha == 0:
        raise ExportError("lora_alpha is 0: the adapter does nothing (and llama.cpp reads alpha 0 as scale 1)")

    out: list[tuple[str, np.ndarray]] = []
    for module in sorted(pairs, key=_natural):
        ab = pairs[module]
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{module}: lora_A or lora_B is missing")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ExportError(f"{module}: lora_A {a.shape} and lora_B {b.shape} do not form a rank-r pair")
        weight = base_shapes.get(module + ".weight")
        if weight is None:
            raise ExportError(f"{module}: the base model has no {module}.weight: the adapter was made for another "
                              "model")
        if len(weight) != 2 or a.shape[1] != weight[1] or b.shape[0] != weight[0]:
            raise ExportError(f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit the base's "
                              f"weight {list(weight)} (lora_A must be [r, {weight[-1]}], lora_B [{weight[0]}, r]): "
                              "the adapter was made for another model")
        r = a.shape[0]
        if r != _pattern_value(cfg.get("rank_pattern") or {}, module, r0):
            raise ExportError(f"{module}: rank {r} in the weights disagrees with adapter_config.json")
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0))
        fold = peft_scaling(r, alpha) / (gguf_alpha / r)  # what llama.cpp's alpha / r leaves out
        base_name = tensor_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if base_name is None:
            raise ExportError(f"{module} has no llama.cpp tensor in architecture {arch_name}")
        if permute_qk and base_name.endswith(".attn_q.weight"):
            b = _permute_rows(b, n_head)
        elif permute_qk and base_name.endswith(".attn_k.weight"):
            b = _permute_rows(b, n_kv_head)
        if not math.isclose(fold, 1.0, rel_tol=1e-9):
            b = b * np.float32(fold)
        out.append((base_name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)))
        out.append((base_name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    return Plan(arch_name, gguf_alpha, out)


def export_gguf(adapter_dir: str | os.PathLike[str], base_config: dict[str, Any], out_file: str | os.PathLike[str],
                *, base_shapes: dict[str, tuple[int, ...]] | None, name: str | None = None,
                roots: Roots | None = None) -> GgufResult:
    """Write ``adapter_dir`` (a PEFT LoRA folder) as a GGUF LoRA for the base whose config.json is ``base_config``.

    The file appears whole, read back and checked, or not at all; an existing file is
    replaced in one rename, and only if it is an earlier GGUF export. Raises
    :class:`~loraq.errors.ExportError`.
    """
    gguf = _gguf()
    plan = plan_export(adapter_dir, base_config, base_shapes, roots=roots)
    out_file = Path(out_file)

    def replaceable() -> None:  # what is there now, checked again just before it is replaced
        target_mod.replaceable(out_file, "gguf", force=True)

    with fsutil.writing_file(out_file, before_replace=replaceable) as tmp:
        writer = gguf.GGUFWriter(str(tmp), plan.architecture)  # writes general.architecture
        writer.add_type(gguf.GGUFType.ADAPTER)  # general.type = "adapter"
        writer.add_name(name or Path(adapter_dir).resolve().name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")  # adapter.type
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(plan.alpha))  # adapter.lora.alpha
        for tensor_name, arr in plan.tensors:
            writer.add_tensor(tensor_name, arr, raw_dtype=gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        verify(tmp, plan)
    return GgufResult(str(out_file), out_file.stat().st_size, plan.architecture, plan.alpha, len(plan.tensors),
                      len(plan.tensors) // 2)


def verify(path: Path, plan: Plan) -> None:
    """Read the written file back with gguf's reader: the metadata and every tensor as planned, bit for bit."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> Any:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    expected = {"general.architecture": plan.architecture, "general.type": "adapter", "adapter.type": "lora"}
    for key, want in expected.items():
        if value(key) != want:
            raise ExportError(f"{path}: {key} reads back as {value(key)!r}, not {want!r}")
    alpha = value(gguf.Keys.Adapter.LORA_ALPHA)
    if alpha is None or not math.isclose(float(alpha), plan.alpha, rel_tol=1e-6):
        raise ExportError(f"{path}: adapter.lora.alpha reads back as {alpha!r}, not {plan.alpha}")
    written = {t.name: t for t in reader.tensors}
    if sorted(written) != sorted(name for name, _ in plan.tensors):
        raise ExportError(f"{path}: the tensors read back are not the ones written")
    for name, arr in plan.tensors:
        got = np.asarray(written[name].data)
        if got.size != arr.size or not np.array_equal(got.reshape(arr.shape), arr):
            raise ExportError(f"{path}: tensor {name} reads back different from what was written")
