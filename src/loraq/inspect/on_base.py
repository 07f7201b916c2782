"""The inspector's checks that need the base model; torch, transformers and peft are imported here only.

First the adapter's module names and shapes are compared with the base model
built from its config on the meta device (no weights loaded, so a 70B base costs
a second, not minutes). Only an adapter that fits and passed every earlier check
is then loaded for real (on the GPU when there is one, in bf16 there, else fp32 on
the CPU) with ``PeftModel.from_pretrained`` and must change the model's output
on a few tokens; with a dataset, base and adapter eval losses go through
:func:`quality_gate`.

A base that cannot be read or built is an :class:`InspectionError` (nothing to
inspect against); an adapter that PEFT cannot load is a ``load_failed`` finding.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, InspectionError, TemplateBudgetError
from ..escape import printable
from ..sandbox import Roots, check_model_folder, hf_cache_dir, is_hub_id, model_folder, path_errors_as
from .lora_config import LoraSettings
from .structure import KEY_PREFIX, WEIGHTS_NAME, Findings, Weights, check_targets
from .verdict import quality_gate

#: Rows of an eval dataset the inspector scores (the first ones): enough to judge, quick on a CPU.
MAX_EVAL_ROWS = 256
EVAL_BATCH = 8
#: A logit change below this (relative to the largest logit) counts as no change.
NO_EFFECT_RTOL = 1e-6
PROBE_TEXT = "The adapter under inspection must change what this model says next."


@dataclass(frozen=True)
class BaseLayout:
    """The base model's adaptable layers and parameters, from its config alone."""

    modules: dict[str, tuple[str, int, int]]  # name -> (kind, in, out); kind: linear | embedding | conv
    params: dict[str, tuple[int, ...]]
    linear: frozenset[str]  # what target_modules="all-linear" selects


def resolve_base(base: str, roots: Roots | None) -> str:
    """The base as a checked local folder: its own (inside ``roots``) or a hub id's snapshot in the local cache.

    Every file of the folder must be a regular file inside ``roots`` (symlinks into
    the Hugging Face cache are, for a hub snapshot); the folder is checked again just
    before the base loads.

    Raises:
        InspectionError: missing, not a folder, outside ``roots``, not in the cache, or a
            file that leads outside the roots.
    """
    path = Path(base).expanduser()
    try:
        local = path.exists()
    except (OSError, ValueError):
        local = False
    if not local and (base.startswith((".", "/", "~")) or not is_hub_id(base)):
        raise InspectionError(f"base model {printable(base)!r} does not exist")
    with path_errors_as(InspectionError):
        if local and not path.resolve().is_dir():
            raise InspectionError(f"base model {printable(base)!r} is not a folder")
        target = str(path.resolve()) if local else base
        allowed = roots if roots is not None else Roots.of([path] if local else [])
        return str(model_folder(target, allowed))


def base_layout(base: str) -> BaseLayout:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(base, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 -- a config transformers cannot build: no base to compare with
        raise InspectionError(f"base model {base}: cannot build it from its config: {type(exc).__name__}: "
                              f"{exc}") from None
    output = model.get_output_embeddings()
    modules: dict[str, tuple[str, int, int]] = {}
    linear = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            modules[name] = ("linear", module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
            modules[name] = ("linear", module.weight.shape[0], module.weight.shape[1])
        elif isinstance(module, torch.nn.Embedding):
            modules[name] = ("embedding", module.num_embeddings, module.embedding_dim)
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            modules[name] = ("conv", module.in_channels, module.out_channels)
        else:
            continue
        if modules[name][0] == "linear" and module is not output:
            linear.add(name)
    params = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    return BaseLayout(modules, params, frozenset(linear))


def check_layout(layout: BaseLayout, weights: Weights, cfg: LoraSettings, found: Findings, *, base: str) -> None:
    """Every module and copy exists in the base with fitting shapes; every targeted layer has weights."""
    f = WEIGHTS_NAME
    for m in sorted(weights.modules.values(), key=lambda m: m.name):
        have = layout.modules.get(m.name)
        if have is None:
            found.add("base_mismatch", "error", f"module {m.name!r} is not a layer of the base model {base}; PEFT "
                                                "would drop its weights (made for another architecture?)", f)
            continue
        kind, n_in, n_out = have
        if m.embedding != (kind == "embedding"):
            found.add("base_shape_mismatch", "error", f"module {m.name!r} is a {kind} layer in the base but the "
                                                      f"adapter stores {'embedding' if m.embedding else 'linear'} "
                                                      "LoRA weights for it", f)
        elif m.dims is not None and m.dims != (n_in, n_out):
            found.add("base_shape_mismatch", "error", f"module {m.name!r}: the adapter maps {m.dims[0]} -> "
                                                      f"{m.dims[1]} features but the base layer maps {n_in} -> "
                                                      f"{n_out}; made for a model of another width?", f)
    for t in weights.copies:
        rest = t.name[len(KEY_PREFIX):]
        if "trainable_tokens_" in rest:
            continue
        name = rest.replace(".base_layer.", ".")
        want = layout.params.get(name)
        if want is None:
            found.add("base_mismatch", "error", f"tensor {t.name!r} copies {name!r}, which the base model lacks", f)
        elif want != t.shape:
            found.add("base_shape_mismatch", "error", f"tensor {t.name!r} has shape {list(t.shape)} but the base's "
                                                      f"{name} has {list(want)}", f)
    if cfg.targets == "all-linear":
        check_targets(weights, cfg, found, all_linear=layout.linear)
    targeted = [n for n in layout.modules if cfg.targets_module(n, layout.linear)]
    for name in targeted:
        if name not in weights.modules:
            found.add("missing_targets", "error", f"target_modules selects the base's {name!r} but the adapter has "
                                                  "no weights for it; PEFT would load it untrained", f)
    _check_budget(layout, weights, cfg, targeted, found)


def _check_budget(layout: BaseLayout, weights: Weights, cfg: LoraSettings, targeted: list[str],
                  found: Findings) -> None:
    """The file may not be much bigger than r x (in + out) per targeted layer implies."""
    lora = [t for m in weights.modules.values() for t in (m.a, m.b) if t is not None]
    itemsize = max((t.nbytes // max(1, _numel(t.shape)) for t in lora if _numel(t.shape)), default=4)
    elements = 0
    for name in targeted:
        kind, n_in, n_out = layout.modules[name]
        module = weights.modules.get(name)
        if kind == "conv" and module is not None and module.a is not None and module.b is not None:
            elements += _numel(module.a.shape) + _numel(module.b.shape)  # kernels: channels were checked above
        else:
            elements += cfg.rank_of(name) * (n_in + n_out)
        elements += 2 * n_out  # a DoRA magnitude and a lora bias, at most one output vector each
    budget = 8 + weights.header.header_len + int(1.25 * elements * itemsize) + weights.copy_bytes + (64 << 10)
    if weights.header.file_size > budget:
        found.add("oversized", "error", f"{WEIGHTS_NAME} is {weights.header.file_size / 2**20:,.2f} MiB but rank "
                                        f"{cfg.r} on the {len(targeted)} targeted layers of this base needs at most "
                                        f"{budget / 2**20:,.2f} MiB", WEIGHTS_NAME)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect_on_base(root: Path, weights: Weights, cfg: LoraSettings, found: Findings, stats: dict[str, Any], *,
                    base: str, data_path: Path | None, min_drop: float, max_seq_len: int,
                    roots: Roots | None = None, chat_template: str | None = None) -> None:
    """Check the adapter against ``base`` (and the dataset), adding findings and stats.

    ``base`` and ``data_path`` come from :func:`resolve_base` and :func:`resolve_data`;
    ``root`` is the private copy of the adapter that PEFT loads; chat rows of the
    dataset render with ``chat_template`` (the adapter folder's) when given.
    """
    allowed = roots if roots is not None else Roots.of([base])
    with path_errors_as(InspectionError):
        check_model_folder(Path(base), allowed.with_read(hf_cache_dir()))  # again, just before it loads
    layout = base_layout(base)
    check_layout(layout, weights, cfg, found, base=base)
    if found.has_errors():
        return  # loading an adapter already known to be broken proves nothing more
    if (slow := peft_regex_problem(cfg, list(layout.modules))) is not None:
        found.add("bad_config", "error", f"adapter_config.json: {slow}", "adapter_config.json")
        return
    _run(root, base, data_path, found, stats, min_drop=min_drop, max_seq_len=max_seq_len,
         n_modules=len(weights.modules), roots=roots, chat_template=chat_template)


#: Seconds Python's own ``re`` may take to match the config's regexes on every module of the base.
PEFT_REGEX_BUDGET_S = 5.0


def peft_regex_problem(cfg: LoraSettings, modules: list[str], budget: float | None = None) -> str | None:
    """Why PEFT's own matching would hang on this config, or ``None``.

    loraq matches with a bounded engine, but PEFT matches ``target_modules`` and
    ``exclude_modules`` with Python's ``re``, which cannot time out, on every module of
    the base as it loads. When either is a regex, that same matching is run first in a
    child process that is killed past ``budget`` seconds.
    """
    patterns = [p for p in (cfg.targets, cfg.exclude) if isinstance(p, str) and p != "all-linear"]
    if not patterns:
        return None
    budget = PEFT_REGEX_BUDGET_S if budget is None else budget
    program = ("import json, re, sys\n"
               "patterns, names = json.load(sys.stdin)\n"
               "for p in patterns:\n"
               "    c = re.compile(p)\n"
               "    for n in names:\n"
               "        c.fullmatch(n)\n")
    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", program], input=json.dumps([patterns, modules]),
                       text=True, capture_output=True, timeout=budget, check=True)
    except subprocess.TimeoutExpired:
        return (f"a regex in target_modules or exclude_modules takes longer than {budget:g} s to match the base's "
                f"{len(modules)} module names with Python's re, as PEFT would; list the module names instead")
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"its regexes cannot be matched with Python's re ({printable(str(exc))[:120]})"
    return None


def resolve_data(data: str, roots: Roots | None) -> Path:
    path = Path(data).expanduser()
    try:
        with path_errors_as(InspectionError):
            if roots is not None:
                roots.check_read(path, what="eval dataset")
            exists = path.is_file()
    except (OSError, ValueError):
        exists = False
    if not exists:
        raise InspectionError(f"eval dataset {printable(data)!r} does not exist")
    return path


def _run(root: Path, base: str, data_path: Path | None, found: Findings, stats: dict[str, Any], *,
         min_drop: float, max_seq_len: int, n_modules: int, roots: Roots | None = None,
         chat_template: str | None = None) -> None:
    from ..model.base import quiet_libraries, resolve_dtype

    quiet_libraries()  # the CLI's output is the findings, not loading bars; before peft (it imports bitsandbytes)
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model.batching import Collator
    from ..model.evaluation import evaluate_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=resolve_dtype("auto", device), use_safetensors=True,
                                                     local_files_only=True)
    except Exception as exc:  # noqa: BLE001 -- safetensors, tokenizers, remote config: any failure means no base
        raise InspectionError(f"base model {base}: cannot load it: {type(exc).__name__}: {exc}") from None
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() as a decorator
    model.eval()
    eval_set = _eval_set(data_path, tokenizer, max_seq_len, roots, chat_template) if data_path is not None else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collator = Collator(pad_id=pad_id)
    probe = _probe(tokenizer, model.config.vocab_size).to(device)
    with torch.no_grad():
        before = model(input_ids=probe).logits.float()
    base_loss = evaluate_loss(model, eval_set, collator, EVAL_BATCH) if eval_set is not None else None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapted = PeftModel.from_pretrained(model, str(root), is_trainable=False)
    except Exception as exc:  # noqa: BLE001 -- third-party code on an untrusted folder: any failure is a finding
        found.add("load_failed", "error", f"PeftModel.from_pretrained fails on this adapter: "
                                          f"{type(exc).__name__}: {str(exc)[:300]}")
        return
    for w in caught:
        if "missing" in str(w.message).lower() and "key" in str(w.message).lower():
            found.add("load_mismatch", "error", f"PEFT loads the adapter with a warning: {str(w.message)[:300]}")
    loaded = sum(1 for m in adapted.modules() if isinstance(m, LoraLayer)
                 and ("default" in m.lora_A or "default" in m.lora_embedding_A))
    if loaded != n_modules:
        found.add("load_mismatch", "error", f"PEFT put LoRA on {loaded} layers but the file holds weights for "
                                            f"{n_modules}")
    adapted.eval()
    with torch.no_grad():
        after = adapted(input_ids=probe).logits.float()
    change = float((after - before).abs().max())
    stats["max_logit_change"] = change
    if not bool(torch.isfinite(after).all()):
        found.add("nonfinite_output", "error", "the model with this adapter outputs NaN or Inf")
    elif change <= NO_EFFECT_RTOL * max(1.0, float(before.abs().max())):
        found.add("no_effect", "error", f"loaded onto {base}, the adapter changes no output logit (largest change "
                                        f"{change:.3g}); it is untrained or scaled to nothing")
    if eval_set is not None and base_loss is not None:
        loss = evaluate_loss(adapted, eval_set, collator, EVAL_BATCH)
        stats.update(base_eval_loss=base_loss, eval_loss=loss, eval_rows=len(eval_set))
        if (gate := quality_gate(base_loss, loss, min_drop)) is not None:
            found.add(gate.code, gate.severity, gate.message)


def _probe(tokenizer: Any, vocab_size: int) -> Any:
    import torch

    ids = [i for i in tokenizer(PROBE_TEXT)["input_ids"][:32] if 0 <= i < vocab_size]
    if len(ids) < 4:
        ids = list(range(1, min(vocab_size, 17)))
    return torch.tensor([ids], dtype=torch.long)


def _eval_set(path: Path, tokenizer: Any, max_seq_len: int, roots: Roots | None = None,
              chat_template: str | None = None) -> Any:
    from .. import data
    from ..model.batching import ListDataset

    try:
        dataset = data.load_dataset(path, roots=roots if roots is not None else Roots.of([path]))
        items = []
        for row in dataset.rows[:MAX_EVAL_ROWS]:
            encoded = data.encode(row, dataset.format, tokenizer, max_seq_len, chat_template)
            if encoded.trainable:
                items.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    except TemplateBudgetError as exc:  # the template ran away (data/budget.py): named, not the data
        named = ("the adapter's chat_template.jinja" if chat_template is not None
                 else "the base model's chat template")
        raise InspectionError(str(exc).replace("the chat template", named, 1)) from None
    except (DataError, data.TemplateError) as exc:
        raise InspectionError(f"eval dataset {path}: {exc}") from None
    if not items:
        raise InspectionError(f"eval dataset {path}: no row keeps a trainable token within {max_seq_len} tokens")
    return ListDataset(items)
