"""The environment the suite runs in is the lock's, exactly; the lock satisfies the package's own ranges."""

from __future__ import annotations

import platform
import re
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "locks"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$")


def pins(lock: Path) -> dict[str, str]:
    found = {}
    for line in lock.read_text().splitlines():
        match = PIN.match(line)
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def this_lock() -> Path:
    flavour = "cuda" if shutil.which("nvidia-smi") else "cpu"
    return LOCKS / f"{platform.system().lower()}-{platform.machine()}-{flavour}.txt"


def test_every_pin_carries_a_hash_and_both_locks_agree_but_for_torchs_build() -> None:
    cpu, cuda = pins(LOCKS / "linux-x86_64-cpu.txt"), pins(LOCKS / "linux-x86_64-cuda.txt")
    assert cpu["torch"].endswith("+cpu") and "+" not in cuda["torch"]
    assert Version(cpu["torch"]).base_version == Version(cuda["torch"]).base_version
    assert not any(name.startswith("nvidia-") for name in cpu), "the CPU lock must never pull CUDA libraries"
    shared = set(cpu) & set(cuda) - {"torch"}
    assert {name for name in shared if cpu[name] != cuda[name]} == set()
    for lock in (LOCKS / "linux-x86_64-cpu.txt", LOCKS / "linux-x86_64-cuda.txt"):
        lines = lock.read_text().splitlines()
        unhashed = [line for i, line in enumerate(lines)
                    if PIN.match(line) and not lines[i + 1].strip().startswith("--hash=sha256:")]
        assert unhashed == [], lock


def test_the_lock_satisfies_every_range_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra]
    locked = pins(LOCKS / "linux-x86_64-cpu.txt")
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in the lock: run make lock"
        version = Version(locked[name])
        assert requirement.specifier.contains(version, prereleases=True), (str(requirement), str(version))


def test_this_environment_holds_exactly_the_locked_versions() -> None:
    lock = this_lock()
    if not lock.is_file():
        pytest.skip(f"no lock for this platform ({lock.name}): make installs pyproject's ranges here")
    wrong = {}
    for name, version in pins(lock).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if Version(installed) != Version(version):
            wrong[name] = (version, installed)
    assert wrong == {}, f"not the lock's versions (make reinstalls when {lock.name} changes): {wrong}"
