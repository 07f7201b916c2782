"""How long the inspector takes beside reading the weights file once.

For adapters of 1 MB to 1 GB (synthetic but valid LoRA safetensors files, written
to a temporary folder and deleted after each size) this measures:

- read: reading every byte of adapter_model.safetensors with Python (``readinto``
  in 8 MiB chunks), the floor for any check that looks at every value;
- inspect: ``inspect_adapter(folder)`` (header, structure, every value once);
- check_finite: what each training checkpoint pays.

Each is timed cold (the file dropped from the page cache with
``posix_fadvise(DONTNEED)`` first, where the OS allows; the median of
``--repeat`` rounds taken in turns) and warm (the best of ``--repeat``).
Ratios are time / read time of the same kind, in one run on one machine:
compare them, not the seconds. Cold times on a VM disk are noisy.

    .venv/bin/python benchmarks/bench_inspect.py [--max-mb 1024] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from loraq.inspect import check_finite, inspect_adapter

SIZES_MB = (1, 10, 100, 1000)
HIDDEN = 4096
RANK = 16
SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
CHUNK = 8 << 20


def write_adapter(folder: Path, size_mb: int, seed: int = 0) -> tuple[Path, int]:
    """A valid all-F32 LoRA adapter of about ``size_mb`` MB on a 4096-wide model, written in a stream.

    Returns the weights file and its number of tensors.
    """
    per_module = RANK * (HIDDEN + HIDDEN) * 4
    n_modules = max(1, round(size_mb * 1e6 / per_module))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for index in range(n_modules):
        module = f"base_model.model.model.layers.{index // len(SUFFIXES)}.{SUFFIXES[index % len(SUFFIXES)]}"
        for part, shape in (("lora_A", [RANK, HIDDEN]), ("lora_B", [HIDDEN, RANK])):
            size = shape[0] * shape[1] * 4
            header[f"{module}.{part}.weight"] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + size]}
            pos += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # as safetensors does: data starts 8-byte aligned
    values = (np.random.default_rng(seed).standard_normal(RANK * HIDDEN) * 0.02).astype(np.float32).tobytes()
    folder.mkdir(parents=True)
    path = folder / "adapter_model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.writelines(values for _ in range(2 * n_modules))  # every tensor is RANK x HIDDEN elements
        f.flush()
        os.fsync(f.fileno())
    # Full module names, as PEFT writes an expanded "all-linear": thousands of them at 1 GB.
    modules = sorted({name.rsplit(".lora_", 1)[0][len("base_model.model."):] for name in header if "lora_" in name})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0,
              "target_modules": modules}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return path, 2 * n_modules


def drop_cache(path: Path) -> bool:
    """Ask the OS to forget the file's cached pages; whether it could be asked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def read_once(path: Path) -> int:
    buffer = bytearray(CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return total


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(folder: Path, path: Path, repeat: int) -> dict[str, float]:
    """Cold: the median of ``repeat`` rounds that take turns (the VM's disk is noisy). Warm: the best."""

    def inspect() -> None:
        result = inspect_adapter(folder)
        assert result.passed, result.findings

    def finite() -> None:
        assert check_finite(path) is None

    runs = {"read": lambda: read_once(path), "inspect": inspect, "check_finite": finite}
    cold: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            drop_cache(path)
            cold[name].append(timed(fn))
    out = {f"{name}_cold": statistics.median(times) for name, times in cold.items()}
    for name, fn in runs.items():
        fn()  # the file is in the page cache from here on
        out[f"{name}_warm"] = min(timed(fn) for _ in range(repeat))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-mb", type=float, default=1024, help="largest adapter to try (MB); default 1024")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the adapters (default: the temp dir)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (cold: median, warm: best)")
    args = parser.parse_args(argv)
    sizes = [s for s in SIZES_MB if s <= args.max_mb]
    root = Path(tempfile.mkdtemp(prefix="loraq-bench-inspect-", dir=args.dir))
    print(f"inspector vs one read of the weights file; python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs; cold = after posix_fadvise(DONTNEED)")
    print()
    print("| size | tensors | read cold | inspect cold | ratio | read warm | inspect warm | ratio "
          "| check_finite warm | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    try:
        warmup, _ = write_adapter(root / "warmup", 1)  # first calls pay for imports and allocator growth
        measure(warmup.parent, warmup, 1)
        shutil.rmtree(warmup.parent)
        for size in sizes:
            folder = root / f"adapter-{size}mb"
            path, n_tensors = write_adapter(folder, size)
            t = measure(folder, path, args.repeat)
            mb = path.stat().st_size / 1e6
            print(f"| {mb:,.0f} MB | {n_tensors:,} | {t['read_cold'] * 1e3:,.1f} ms "
                  f"| {t['inspect_cold'] * 1e3:,.1f} ms "
                  f"| {t['inspect_cold'] / t['read_cold']:.2f} | {t['read_warm'] * 1e3:,.1f} ms "
                  f"| {t['inspect_warm'] * 1e3:,.1f} ms | {t['inspect_warm'] / t['read_warm']:.2f} "
                  f"| {t['check_finite_warm'] * 1e3:,.1f} ms | {t['check_finite_warm'] / t['read_warm']:.2f} |",
                  flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
