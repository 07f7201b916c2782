"""Serving verdicts: will vLLM, LoRAX and llama.cpp / Ollama serve this adapter, and if not, why.

Torch-free: the verdicts read ``adapter_config.json``, the tensor names and ranks of the
safetensors header, and the base model's ``config.json``. The same rules judge a job's
settings before training (:func:`facts_from_spec`, the submit-time gate) and the adapter
that training produced (:func:`facts_from_adapter`, in the inspector and at publish), and
the GGUF exporter refuses exactly what the llama.cpp verdict refuses.

Each "no" carries the reason and what to change, with the job field to change where the
job has one (``lora.r``, ``lora.target_modules``): a gate at submit names it.

Where the rules come from:

* vLLM: ``--max-lora-rank`` takes one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default
  16) and an adapter of any rank up to it is served (padded to it); ``PEFTHelper`` in
  vllm/lora/peft_helper.py refuses ``use_dora`` ("vLLM does not yet support DoRA") and a
  non-empty ``modules_to_save``.
* LoRAX: the target modules per architecture listed in predibase/lorax
  docs/models/adapters/lora.md ("Target Modules"; the same lists as ``ADAPTER_LAYERS`` in
  server/lorax_server/models/flash_llama.py, flash_mistral.py, flash_qwen2.py). LoRAX
  ignores any other target module with only a warning on the server.
* llama.cpp / Ollama: what ``src/llama-adapter.cpp`` (llama-cpp-python 0.3.36) applies,
  ``lora_a`` / ``lora_b`` pairs scaled by alpha / r, and what crashed it when tried (see
  :mod:`loraq.export.gguf`): no DoRA, no modules saved whole, no LoRA on ``embed_tokens``
  or ``lm_head``; loraq writes GGUF LoRA for the architectures in
  :data:`GGUF_ARCHITECTURES`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Engines a queue can require with ``serving: [...]``; "ollama" is llama.cpp's name there
#: (the same names as queue.spec.SERVING_ENGINES, which validates a queue file's list).
ENGINES = ("vllm", "lorax", "llamacpp")
ALIASES = {"ollama": "llamacpp", "llama.cpp": "llamacpp"}
LABELS = {"vllm": "vLLM", "lorax": "LoRAX", "llamacpp": "llama.cpp / Ollama"}

#: vLLM's allowed ``--max-lora-rank`` values (``possible_max_ranks`` in vllm/config) and its default.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16

_LLAMA_LIKE = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})

#: LoRAX's supported target modules by ``model_type`` (config.json), from predibase/lorax
#: docs/models/adapters/lora.md, section "Target Modules" (found with the code search of
#: this project's research; the Llama, Mistral and Qwen2 lists match ``ADAPTER_LAYERS`` in
#: server/lorax_server/models/flash_{llama,mistral,qwen2}.py).
LORAX_TARGETS: dict[str, frozenset[str]] = {
    "llama": _LLAMA_LIKE | {"lm_head"},
    "mistral": _LLAMA_LIKE | {"lm_head"},
    "mixtral": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"}),
    "gemma": _LLAMA_LIKE,
    "phi3": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"}),
    "phi": frozenset({"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"}),
    "qwen2": _LLAMA_LIKE | {"lm_head"},
    "qwen": frozenset({"c_attn", "c_proj", "w1", "w2", "lm_head"}),
    "cohere": _LLAMA_LIKE | {"lm_head"},
    "dbrx": frozenset({"Wqkv", "out_proj", "lm_head"}),
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc"}),
    "bloom": frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"}),
}

#: What PEFT's ``target_modules: all-linear`` selects (every Linear but the output layer),
#: by ``model_type``, as module name tails. Other types: unknown until the adapter exists.
ALL_LINEAR: dict[str, frozenset[str]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "cohere", "granite", "olmo2"],
                    _LLAMA_LIKE),
    "mixtral": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "gate"}),
    "phi3": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    "phi": frozenset({"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}),
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc"}),
    "bloom": frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
}

#: HF architectures loraq writes GGUF LoRA for -> (llama.cpp architecture, q/k rows permuted for RoPE).
GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
#: Module tails with a llama.cpp tensor in those architectures.
GGUF_TARGETS = _LLAMA_LIKE
EMBEDDINGS = frozenset({"embed_tokens", "wte", "lm_head", "embed_out"})

#: PEFT options that change the forward pass in ways a GGUF LoRA cannot express.
LLAMACPP_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) rescales each weight by a learned magnitude; llama.cpp applies only B·A",
    "modules_to_save": "modules_to_save stores whole modules; llama.cpp applies only lora_a/lora_b pairs",
    "trainable_token_indices": "trainable tokens replace embedding rows; llama.cpp cannot apply them",
    "layer_replication": "layer_replication changes the base's layer stack",
    "use_qalora": "QA-LoRA pools the input before lora_A; llama.cpp applies plain B·A·x",
    "lora_bias": "lora_bias adds a bias to lora_B; llama.cpp applies no LoRA bias",
    "target_parameters": "LoRA on parameters (target_parameters) has no lora_a/lora_b module form",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not verified by loraq's exporter",
    "arrow_config": "Arrow routing is not a plain LoRA",
}

_LORA_TENSOR = re.compile(r"(?P<module>.+?)\.(?:lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                          r"(?:\.\w+)?")
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Reason:
    """One reason an engine will not serve the adapter: what is wrong and what to change."""

    message: str
    field: str | None = None  # the job field to change ("lora.r"), where a job has one


@dataclass(frozen=True)
class Verdict:
    """One engine's verdict: ``servable`` is True, False, or None (cannot tell; ``reasons`` say why)."""

    engine: str
    servable: bool | None
    reasons: tuple[Reason, ...] = ()
    notes: tuple[str, ...] = ()
    flags: str | None = None  # what the engine must be started with, e.g. "--max-lora-rank 32"

    @property
    def label(self) -> str:
        return LABELS[self.engine]

    def summary(self) -> str:
        """One line: "yes (--max-lora-rank 8)", "no: ...", "unknown: ..."."""
        if self.servable:
            return "yes" + (f" ({self.flags})" if self.flags else "")
        word = "no" if self.servable is False else "unknown"
        return f"{word}: " + "; ".join(r.message for r in self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {"servable": self.servable, "why": [r.message for r in self.reasons],
                "fields": sorted({r.field for r in self.reasons if r.field}), "notes": list(self.notes),
                "flags": self.flags}


@dataclass(frozen=True)
class BaseFacts:
    """What the verdicts need from the base model's config.json."""

    model_type: str | None
    architecture: str | None
    tied: bool

    @classmethod
    def of(cls, config: dict[str, Any] | None) -> BaseFacts | None:
        if not isinstance(config, dict):
            return None
        archs = config.get("architectures")
        arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
        return cls(model_type=model_type, architecture=arch, tied=config.get("tie_word_embeddings") is True)


@dataclass(frozen=True)
class AdapterFacts:
    """What the verdicts need from an adapter, or from the job settings that will make one."""

    max_rank: int
    targets: frozenset[str] | None  # module name tails carrying LoRA; None: not known yet
    options: dict[str, Any] = field(default_factory=dict)  # PEFT options set (use_dora, modules_to_save, ...)
    saved_whole: tuple[str, ...] = ()  # tensors that are not LoRA pairs (modules saved whole)
    base: BaseFacts | None = None


# ---------------------------------------------------------------- facts


def facts_from_spec(lora: Any, base_config: dict[str, Any] | None) -> AdapterFacts:
    """The facts a job's ``lora`` settings (a :class:`~loraq.queue.spec.LoraSpec`) will produce."""
    base = BaseFacts.of(base_config)
    if lora.target_modules == "all-linear":
        targets = ALL_LINEAR.get(base.model_type or "") if base else None
    else:
        targets = frozenset(str(t).rsplit(".", 1)[-1] for t in lora.target_modules)
    # the PEFT options the job passes on (spec.LoraSpec): DoRA and whole modules refuse engines before training
    options = {key: value for key in ("use_dora", "use_rslora", "modules_to_save")
               if (value := getattr(lora, key, None))}
    return AdapterFacts(max_rank=int(lora.r), targets=targets, options=options, base=base)


def facts_from_adapter(config: dict[str, Any], tensors: Iterable[tuple[str, tuple[int, ...]]],
                       base_config: dict[str, Any] | None) -> AdapterFacts:
    """The facts of a saved adapter: its config and its tensors' ``(name, shape)``."""
    modules: set[str] = set()
    saved_whole: list[str] = []
    ranks: list[int] = []
    for name, shape in tensors:
        match = _LORA_TENSOR.fullmatch(name)
        if match is None:
            saved_whole.append(name)
            continue
        module = match.group("module").removeprefix(_PREFIX)
        modules.add(module.rsplit(".", 1)[-1])
        if (".lora_A." in name or name.endswith(".lora_embedding_A")) and len(shape) >= 1:
            ranks.append(int(shape[0]))
    patterns: dict[str, Any] = config["rank_pattern"] if isinstance(config.get("rank_pattern"), dict) else {}
    declared = [v for v in [config.get("r"), *patterns.values()] if isinstance(v, int) and not isinstance(v, bool)]
    options = {key: config[key] for key in LLAMACPP_UNSUPPORTED_OPTIONS if config.get(key)}
    for key in ("use_rslora", "bias"):
        if config.get(key) not in (None, False, "none"):
            options[key] = config[key]
    return AdapterFacts(max_rank=max(ranks or declared or [0]), targets=frozenset(modules),
                        options=options, saved_whole=tuple(saved_whole), base=BaseFacts.of(base_config))


def read_base_config(base: str | Path | None) -> dict[str, Any] | None:
    """A base model's config.json from its folder, or from the local Hugging Face cache for a hub id.

    Never downloads; ``None`` when it cannot be read.
    """
    if not base:
        return None
    path = Path(base).expanduser()
    candidate: Path | None = path / "config.json" if path.is_dir() else None
    if candidate is None and not str(base).startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(base), "config.json")
            candidate = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 -- a malformed id or an unreadable cache: no config
            candidate = None
    if candidate is None or not candidate.is_file():
        return None
    try:
        data = json.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- the verdicts


def verdicts(facts: AdapterFacts) -> dict[str, Verdict]:
    """Every engine's verdict, keyed by engine."""
    return {"vllm": vllm_verdict(facts), "lorax": lorax_verdict(facts), "llamacpp": llamacpp_verdict(facts)}


def _names(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


def vllm_verdict(facts: AdapterFacts) -> Verdict:
    reasons: list[Reason] = []
    notes: list[str] = []
    flags = None
    rank = facts.max_rank
    fitting = [v for v in VLLM_MAX_LORA_RANKS if v >= rank]
    if not fitting:
        reasons.append(Reason(f"rank {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM "
                              f"accepts ({', '.join(map(str, VLLM_MAX_LORA_RANKS))}); set lora.r to "
                              f"{VLLM_MAX_LORA_RANKS[-1]} or less", "lora.r"))
    else:
        flags = f"--max-lora-rank {fitting[0]}"
        if fitting[0] > VLLM_DEFAULT_MAX_LORA_RANK:
            notes.append(f"vLLM's default --max-lora-rank is {VLLM_DEFAULT_MAX_LORA_RANK}: start it with "
                         f"--enable-lora {flags}")
        if fitting[0] != rank:
            notes.append(f"rank {rank} is served padded to {fitting[0]}: lora.r {fitting[0]} costs the same memory")
    if facts.options.get("use_dora"):
        reasons.append(Reason("DoRA (use_dora): vLLM refuses it ('vLLM does not yet support DoRA'); train with "
                              "use_dora off", "lora.use_dora"))
    if facts.options.get("modules_to_save") or facts.saved_whole:
        what = facts.options.get("modules_to_save") or [n.removeprefix(_PREFIX) for n in facts.saved_whole[:3]]
        reasons.append(Reason(f"modules saved whole ({_names(map(str, what))}): vLLM accepts only "
                              "modules_to_save: None; train without modules_to_save", "lora.modules_to_save"))
    return Verdict("vllm", not reasons, tuple(reasons), tuple(notes), flags)


def lorax_verdict(facts: AdapterFacts) -> Verdict:
    base = facts.base
    if base is None or base.model_type is None:
        return Verdict("lorax", None, (Reason("the base model's architecture is unknown (no config.json to read); "
                                              "give the base model (--base) to judge its target modules"),))
    supported = LORAX_TARGETS.get(base.model_type)
    if supported is None:
        return Verdict("lorax", False, (Reason(f"LoRAX lists no LoRA target modules for model type "
                                               f"{base.model_type!r} (it lists {_names(LORAX_TARGETS)}); serve this "
                                               "base with another engine"),))
    if facts.targets is None:
        return Verdict("lorax", None, (Reason(f"which modules all-linear selects on model type {base.model_type!r} "
                                              "is known only once the adapter exists; list lora.target_modules",
                                              "lora.target_modules"),))
    ignored = facts.targets - supported
    if ignored:
        return Verdict("lorax", False, (Reason(f"LoRAX ignores LoRA on {_names(ignored)} for {base.model_type} with "
                                               f"only a warning (it supports {_names(supported)}); remove "
                                               f"{_names(ignored)} from lora.target_modules", "lora.target_modules"),))
    return Verdict("lorax", True)


def llamacpp_verdict(facts: AdapterFacts) -> Verdict:
    reasons: list[Reason] = []
    for key, why in LLAMACPP_UNSUPPORTED_OPTIONS.items():
        if facts.options.get(key):
            reasons.append(Reason(f"{key} is set: {why}; train without it to serve with llama.cpp",
                                  f"lora.{key}" if key in ("use_dora", "modules_to_save") else None))
    if facts.options.get("bias"):
        reasons.append(Reason(f"bias={facts.options['bias']!r} trains the base's biases; llama.cpp applies no LoRA "
                              "bias; train with bias: none"))
    if facts.saved_whole and not facts.options.get("modules_to_save"):
        reasons.append(Reason(f"{len(facts.saved_whole)} tensor(s) are not LoRA pairs (e.g. "
                              f"{facts.saved_whole[0].removeprefix(_PREFIX)!r}: a module saved whole); llama.cpp "
                              "applies only lora_a/lora_b pairs"))
    base = facts.base
    embeddings = (facts.targets or frozenset()) & EMBEDDINGS
    if embeddings:
        tied = " (this base ties lm_head to embed_tokens: llama.cpp crashes on it)" if base and base.tied else ""
        reasons.append(Reason(f"LoRA on {_names(embeddings)}: llama.cpp cannot apply LoRA to embed_tokens / "
                              f"lm_head{tied}; remove {_names(embeddings)} from lora.target_modules",
                              "lora.target_modules"))
    if base is None or base.architecture is None:
        if reasons:
            return Verdict("llamacpp", False, tuple(reasons))
        return Verdict("llamacpp", None, (Reason("the base model's architecture is unknown (no config.json to "
                                                 "read); give the base model (--base) to judge"),))
    if base.architecture not in GGUF_ARCHITECTURES:
        reasons.append(Reason(f"loraq writes GGUF LoRA for {', '.join(GGUF_ARCHITECTURES)} bases, not "
                              f"{base.architecture}; serve it with another engine"))
    elif facts.targets is None:
        if not reasons:
            return Verdict("llamacpp", None, (Reason("which modules all-linear selects is known only once the "
                                                     "adapter exists; list lora.target_modules",
                                                     "lora.target_modules"),))
    else:
        missing = facts.targets - GGUF_TARGETS - EMBEDDINGS
        if missing:
            reasons.append(Reason(f"{_names(missing)} have no llama.cpp tensor in {base.architecture}; keep "
                                  f"lora.target_modules to {_names(GGUF_TARGETS)}", "lora.target_modules"))
    notes = ("loraq export ADAPTER --to gguf FILE.gguf; then llama-server -m BASE.gguf --lora FILE.gguf, or "
             "ADAPTER FILE.gguf in an Ollama Modelfile",) if not reasons else ()
    return Verdict("llamacpp", not reasons, tuple(reasons), notes)


# ---------------------------------------------------------------- the gate


def normalize(engines: Iterable[str]) -> list[str]:
    """Engine names as :data:`ENGINES` spells them (``ollama`` is llama.cpp); unknown names raise ValueError."""
    out: list[str] = []
    for name in engines:
        engine = ALIASES.get(str(name).lower(), str(name).lower())
        if engine not in ENGINES:
            raise ValueError(f"{name!r} is not a serving engine loraq judges (one of: vllm, lorax, llamacpp, ollama)")
        if engine not in out:
            out.append(engine)
    return out


def gate(found: dict[str, Verdict], required: Iterable[str]) -> list[tuple[Verdict, Reason]]:
    """The reasons the required engines will not (or may not) serve the adapter; empty when all will."""
    failures: list[tuple[Verdict, Reason]] = []
    for engine in normalize(required):
        verdict = found[engine]
        if not verdict.servable:
            failures.extend((verdict, reason) for reason in verdict.reasons)
    return failures
