"""benchmarks/gpu_check.sh without a GPU: it parses, explains itself, and refuses the GPU mode in one line.

The script's full CPU run (``--cpu-smoke``: every step at tiny sizes, ~3-5 minutes on 2 cores)
is run by hand; here only what takes no training.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def bash(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_script_parses_and_its_help_names_every_step() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False).returncode == 0
    shown = bash("--help")
    assert shown.returncode == 0
    for step in ("setup", "queue", "ray", "bench", "--cpu-smoke", "--devices 0", "bf16", "cuda_peak_mb"):
        assert step in shown.stdout, step


def test_an_unknown_argument_is_one_line_and_exit_2() -> None:
    wrong = bash("--gpus")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.strip().splitlines() == ["gpu_check.sh: unknown argument '--gpus' (use --cpu-smoke, --out DIR or --help)"]


def test_without_a_gpu_the_gpu_mode_says_so_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    smi = shutil.which("nvidia-smi")
    if smi and subprocess.run([smi, "-L"], capture_output=True, check=False).returncode == 0:
        pytest.skip("this machine has a GPU: the GPU mode would run")
    out = tmp_path / "out"
    refused = bash("--out", str(out))
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "no NVIDIA GPU" in refused.stderr
    assert "--cpu-smoke" in refused.stderr and not out.exists()
