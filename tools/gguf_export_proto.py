#!/usr/bin/env python3
"""Prototype: write a PEFT LoRA adapter folder as a GGUF LoRA file that llama.cpp loads.

    python tools/gguf_export_proto.py ADAPTER_DIR BASE_CONFIG_JSON OUT.gguf

Only safetensors-format adapters, numpy and the `gguf` package; no torch. It follows what
llama.cpp's own `convert_lora_to_gguf.py` writes and what `src/llama-adapter.cpp` accepts
(llama.cpp as vendored by llama-cpp-python 0.3.36, gguf-py 0.19.0):

* metadata: general.architecture = the base's llama.cpp architecture ("llama", "qwen2", ...;
  the loader refuses a mismatch), general.type = "adapter", adapter.type = "lora",
  adapter.lora.alpha (FLOAT32; the loader reads it with gguf_get_val_f32).
* tensors: for each adapted module, "<gguf base tensor name>.lora_a" and ".lora_b", the
  base name from gguf.get_tensor_name_map(arch, n_layers), e.g.
  model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight.lora_a / .lora_b.
  lora_a is PEFT's lora_A (numpy shape (r, in), ggml ne = [in, r]); lora_b is PEFT's lora_B
  ((out, r), ne = [r, out]); neither is transposed. float32.
* llama.cpp applies scale = adapter.lora.alpha / r per tensor (r = lora_b's ne[0]); alpha 0
  means scale 1. PEFT's scaling is lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), per module
  with rank_pattern / alpha_pattern. The file's alpha is the default module's scaling * r;
  a module whose scaling differs has the ratio folded into its lora_b.
* the Llama family (llama, mistral) stores q/k weights with their rows permuted for
  llama.cpp's RoPE layout (convert_hf_to_gguf's LlamaModel.permute, n_head for q, n_kv_head
  for k): lora_b of q_proj / k_proj gets the same row permutation; lora_a is untouched.

Refused, with the reason (ExportRefused): DoRA (lora_magnitude_vector), modules_to_save,
trainable tokens, LoRA on embed_tokens or lm_head, bias training, and any tensor or option
whose effect llama.cpp cannot reproduce. (On a base with tied embeddings, such as SmolLM2,
llama.cpp 0.3.36 kills the process: an embed_tokens LoRA written as the converter does,
token_embd.weight.lora_a = A.T, fails GGML_ASSERT(ggml_can_mul_mat) at the first decode,
because the output projection reuses token_embd; an lm_head LoRA (output.weight.*) loads and
then segfaults at the first decode.)
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

# HF architecture -> (llama.cpp architecture, q/k rows permuted for RoPE?)
ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": (gguf.MODEL_ARCH.QWEN3, False),
}
PREFIX = "base_model.model."
# PEFT options that change the forward pass in ways a GGUF LoRA cannot express.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) rescales each weight by a learned magnitude; llama.cpp applies only B·A",
    "modules_to_save": "modules_to_save stores whole modules; llama.cpp applies only lora_a/lora_b pairs",
    "trainable_token_indices": "trainable tokens replace embedding rows; llama.cpp cannot apply them",
    "layer_replication": "layer_replication changes the base's layer stack",
    "use_qalora": "QA-LoRA pools the input before lora_A; llama.cpp applies plain B·A·x",
    "lora_bias": "lora_bias adds a bias to lora_B; llama.cpp applies no LoRA bias",
    "target_parameters": "LoRA on parameters (target_parameters) has no lora_a/lora_b module form",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not verified by this exporter",
    "arrow_config": "Arrow routing is not a plain LoRA",
}
_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16"}


class ExportRefused(ValueError):
    """The adapter cannot be written as a GGUF LoRA that llama.cpp applies faithfully."""


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor as a float32 array (bf16 too, which numpy and safetensors' numpy API lack)."""
    raw = path.read_bytes()
    if len(raw) < 8:
        raise ExportRefused(f"{path}: not a safetensors file")
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    body = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ExportRefused(f"{path}: tensor {name} has dtype {info['dtype']}; expected a float type")
        start, end = info["data_offsets"]
        buf = body[start:end]
        if dtype == "bf16":
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.float32)
        out[name] = arr.reshape(info["shape"])
    return out


_EMBEDDINGS = ("embed_tokens", "wte", "lm_head", "embed_out")


def _embedding_refusal(module: str, base_config: dict) -> str:
    tied = ""
    if base_config.get("tie_word_embeddings"):
        tied = " (this base ties lm_head to embed_tokens: its GGUF has no output.weight)"
    return (
        f"LoRA on {module}: adapters on embed_tokens / lm_head are refused for llama.cpp{tied}; "
        "remove them from target_modules (and do not resize the vocabulary)"
    )


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern key that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute applied to lora_b's rows (the output side)."""
    rows = b.shape[0]
    if rows % (2 * n_head):
        raise ExportRefused(f"lora_B has {rows} rows, not a multiple of 2 x {n_head} heads")
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def plan_export(adapter_dir: str | os.PathLike, base_config: dict):
    """Check the adapter and compute what to write: (arch, alpha, [(gguf name, array)])."""
    adapter_dir = Path(adapter_dir)
    cfg_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise ExportRefused(f"{adapter_dir}: no adapter_config.json")
    if not weights_file.is_file():
        raise ExportRefused(f"{adapter_dir}: no adapter_model.safetensors (pickle .bin adapters are not read)")
    cfg = json.loads(cfg_file.read_text())

    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportRefused(f"peft_type is {cfg.get('peft_type')}; only LoRA adapters can be written as GGUF LoRA")
    for key, why in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(key):
            raise ExportRefused(f"{key} is set: {why}; train without it to serve with llama.cpp")
    if cfg.get("bias", "none") != "none":
        raise ExportRefused(f"bias={cfg['bias']!r} trains base biases; llama.cpp applies no LoRA bias; use bias: none")

    hf_arch = (base_config.get("architectures") or [None])[0]
    if hf_arch not in ARCHITECTURES:
        raise ExportRefused(
            f"base architecture {hf_arch!r} is not supported for GGUF export (supported: {', '.join(ARCHITECTURES)})"
        )
    arch, permute_qk = ARCHITECTURES[hf_arch]
    n_layers = int(base_config["num_hidden_layers"])
    n_head = int(base_config["num_attention_heads"])
    n_kv_head = int(base_config.get("num_key_value_heads") or n_head)
    tensor_map = gguf.get_tensor_name_map(arch, n_layers)

    tensors = _read_safetensors(weights_file)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        if not name.startswith(PREFIX):
            raise ExportRefused(f"unexpected tensor {name!r} (not under {PREFIX!r})")
        rel = name[len(PREFIX) :]
        owner = re.sub(r"\.(lora_\w+|base_layer)(\.\w+)?$|\.(weight|bias)$", "", rel)  # the module it belongs to
        if owner.split(".")[-1] in _EMBEDDINGS:
            raise ExportRefused(_embedding_refusal(owner, base_config))
        m = _TENSOR.match(rel)
        if m is None:
            if "lora_magnitude_vector" in name:
                raise ExportRefused(
                    f"{name} is a DoRA magnitude; llama.cpp cannot apply DoRA; train with use_dora: false"
                )
            raise ExportRefused(
                f"{name} is not a lora_A / lora_B tensor (a module saved whole, e.g. modules_to_save?); "
                "llama.cpp applies only LoRA pairs"
            )
        module, part = m["module"], m["part"]
        if part.startswith("lora_embedding"):
            raise ExportRefused(_embedding_refusal(module, base_config))
        pairs.setdefault(module, {})["A" if part.startswith("lora_A") else "B"] = arr
    if not pairs:
        raise ExportRefused(f"{weights_file}: no LoRA tensors")

    r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora"))

    def peft_scaling(r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if rslora else alpha / r

    gguf_alpha = peft_scaling(r0, alpha0) * r0  # rsLoRA: alpha * sqrt(r)
    if gguf_alpha == 0:
        raise ExportRefused("lora_alpha is 0: the adapter does nothing (and llama.cpp reads alpha 0 as scale 1)")

    out: list[tuple[str, np.ndarray]] = []
    for module in sorted(pairs, key=_natural):
        ab = pairs[module]
        if set(ab) != {"A", "B"}:
            raise ExportRefused(f"{module}: lora_A or lora_B is missing")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ExportRefused(f"{module}: lora_A {a.shape} and lora_B {b.shape} do not form a rank-r pair")
        r = a.shape[0]
        if r != _pattern_value(cfg.get("rank_pattern") or {}, module, r0):
            raise ExportRefused(f"{module}: rank {r} in the weights disagrees with adapter_config.json")
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0))
        fold = peft_scaling(r, alpha) / (gguf_alpha / r)  # what llama.cpp's alpha / r leaves out
        base_name = tensor_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if base_name is None:
            raise ExportRefused(f"{module} has no llama.cpp tensor in architecture {arch.name.lower()}")
        if permute_qk and base_name.endswith(".attn_q.weight"):
            b = _permute_rows(b, n_head)
        elif permute_qk and base_name.endswith(".attn_k.weight"):
            b = _permute_rows(b, n_kv_head)
        if not math.isclose(fold, 1.0, rel_tol=1e-9):
            b = b * np.float32(fold)
        out.append((base_name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)))
        out.append((base_name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    return arch, gguf_alpha, out


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def export_gguf(adapter_dir: str | os.PathLike, base_config: dict, out_file: str | os.PathLike) -> None:
    """Write adapter_dir (a PEFT LoRA folder) as a GGUF LoRA for the base described by base_config
    (its config.json as a dict). The file appears whole or not at all. Raises ExportRefused."""
    arch, alpha, tensors = plan_export(adapter_dir, base_config)
    out_file = Path(out_file)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])  # writes general.architecture
        writer.add_type(gguf.GGUFType.ADAPTER)  # general.type = "adapter"
        writer.add_name(Path(adapter_dir).resolve().name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")  # adapter.type
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))  # adapter.lora.alpha
        for name, arr in tensors:
            writer.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: gguf_export_proto.py ADAPTER_DIR BASE_CONFIG_JSON OUT.gguf", file=sys.stderr)
        return 2
    try:
        export_gguf(argv[0], json.loads(Path(argv[1]).read_text()), argv[2])
    except ExportRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    print(argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
