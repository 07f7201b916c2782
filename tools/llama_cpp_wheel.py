#!/usr/bin/env python3
"""Build the llama-cpp-python wheel once per machine and cache it outside the repository.

    python tools/llama_cpp_wheel.py            # prints the cached wheel's path (builds it first if needed)
    python tools/llama_cpp_wheel.py --install  # ... and pip-installs it into this interpreter

llama-cpp-python ships only a source distribution on PyPI: `pip wheel` compiles llama.cpp
with the machine's cmake and C/C++ compiler (minutes on a small machine). The wheel goes to

    $LORAQ_CACHE/wheels/<key>/   (else ~/.cache/loraq/wheels/<key>/)
    key = llama-cpp-python-<version>-<python tag>-<platform>_<machine>-<hash of CMAKE_ARGS>

It is built in a temporary folder beside the cache and moved in with one rename, so the
folder holds a whole wheel or nothing; an exclusive lock (<key>.lock) makes concurrent
callers build it once: the others wait and then return the same path. A second call returns
at once. When the package index or a compiler cannot be reached it prints one line saying so
and exits 1; any other build failure names its log.

CMAKE_ARGS (environment) overrides DEFAULT_CMAKE_ARGS and is part of the key:
-DGGML_NATIVE=OFF builds for the x86-64 AVX2 baseline instead of -march=native, so a cached
wheel stays valid on any CPU of the same kind; -DLLAVA_BUILD=OFF leaves out the multimodal
library (mtmd), which loraq does not use.

Measured on the shared 2-core machine (2026-12-01, other jobs running): upstream defaults
(CMAKE_ARGS="") 378 s CPU, 391 s wall, a 24.4 MB wheel; DEFAULT_CMAKE_ARGS 334 s CPU
(520 s wall under heavier load), a 19.6 MB wheel. Nearly all of it is compiling llama.cpp
itself; a cached call takes 0.04 s.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
DEFAULT_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"

_INDEX_ERRORS = re.compile(
    r"No matching distribution found|Could not find a version that satisfies"
    r"|Failed to establish a new connection|Max retries exceeded|NewConnectionError"
    r"|Temporary failure in name resolution|Name or service not known|Network is unreachable"
    r"|Connection refused|Read timed out|SSLError|ProxyError",
)
_COMPILER_ERRORS = re.compile(
    r"No CMAKE_C(XX)?_COMPILER could be found|CMAKE_C(XX)?_COMPILER not set"
    r"|The C(XX)? compiler .* is not able to compile|C(XX)? compiler identification is unknown",
)


class WheelError(RuntimeError):
    """The wheel could not be built; str() is one line a person can act on."""


def cache_root() -> Path:
    env = os.environ.get("LORAQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraq"


def cmake_args() -> str:
    env = os.environ.get("CMAKE_ARGS")
    return DEFAULT_CMAKE_ARGS if env is None else env


def python_tag() -> str:
    impl = {"cpython": "cp", "pypy": "pp"}.get(sys.implementation.name, sys.implementation.name)
    return f"{impl}{sys.version_info.major}{sys.version_info.minor}"


def cache_key(args: str | None = None) -> str:
    args = cmake_args() if args is None else args
    digest = hashlib.sha256(" ".join(args.split()).encode()).hexdigest()[:8]
    plat = f"{sys.platform}_{platform.machine().lower()}"
    return f"{PACKAGE}-{VERSION}-{python_tag()}-{plat}-{digest}"


def _cached_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    return wheels[0] if len(wheels) == 1 else None


@contextmanager
def _locked(lock_file: Path):
    with open(lock_file, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _have_compilers() -> str | None:
    """None when a C and a C++ compiler are on PATH (or named by CC / CXX); else what is missing."""
    missing = []
    for env, names in (("CC", ("cc", "gcc", "clang")), ("CXX", ("c++", "g++", "clang++"))):
        named = os.environ.get(env)
        found = shutil.which(named.split()[0]) if named else any(shutil.which(n) for n in names)
        if not found:
            missing.append(f"{env}={named}" if named else " / ".join(names))
    return ", ".join(missing) or None


def _build(final: Path, args: str, log: Callable[[str], None]) -> Path:
    missing = _have_compilers()
    if missing:
        raise WheelError(
            f"cannot build {PACKAGE}=={VERSION}: no compiler found ({missing}); "
            "install gcc and g++ (Debian: apt-get install build-essential) or set CC and CXX"
        )
    parent = final.parent
    for stale in parent.glob(f".build-{final.name}-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=parent))
    try:
        out = tmp / "wheel"
        out.mkdir()
        env = dict(os.environ, CMAKE_ARGS=args)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        # --no-cache-dir: pip's own wheel cache would hand back a wheel built with other CMAKE_ARGS
        cmd = [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
            f"{PACKAGE}=={VERSION}", "-w", str(out),
        ]
        log(f"llama_cpp_wheel: building {PACKAGE}=={VERSION} (CMAKE_ARGS={args!r}); this takes minutes")
        start = time.monotonic()
        with open(tmp / "build.log", "w") as fh:
            rc = subprocess.call(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        seconds = time.monotonic() - start
        text = (tmp / "build.log").read_text(errors="replace")
        wheel = _cached_wheel(out)
        if rc != 0 or wheel is None:
            kept = parent / f"{final.name}.failed.log"
            shutil.copyfile(tmp / "build.log", kept)
            if _INDEX_ERRORS.search(text):
                raise WheelError(
                    f"cannot reach the package index for {PACKAGE}=={VERSION} "
                    f"(pip exit {rc}); check the network or PIP_INDEX_URL; log: {kept}"
                )
            if _COMPILER_ERRORS.search(text):
                raise WheelError(
                    f"cannot build {PACKAGE}=={VERSION}: cmake found no working C/C++ compiler; "
                    f"install gcc and g++ or set CC and CXX; log: {kept}"
                )
            raise WheelError(f"building {PACKAGE}=={VERSION} failed (pip exit {rc}); log: {kept}")
        info = {
            "package": PACKAGE, "version": VERSION, "cmake_args": args, "python": sys.version.split()[0],
            "machine": platform.machine(), "build_seconds": round(seconds, 1),
            "wheel": wheel.name, "wheel_bytes": wheel.stat().st_size,
        }
        (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.move(str(tmp / "build.log"), out / "build.log")
        size = wheel.stat().st_size
        os.rename(out, final)  # atomic: the key folder appears whole
        log(f"llama_cpp_wheel: built in {seconds:.0f} s, {size / 1e6:.1f} MB")
        return final / wheel.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_wheel(log: Callable[[str], None] | None = None) -> Path:
    """The cached wheel's path, building it first when this machine has none."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    args = cmake_args()
    final = cache_root() / "wheels" / cache_key(args)
    wheel = _cached_wheel(final)
    if wheel:
        return wheel
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f"{final.name}.lock"):
        wheel = _cached_wheel(final)  # another caller built it while we waited
        if wheel:
            return wheel
        if final.exists():  # a folder without exactly one wheel: not ours to trust
            shutil.rmtree(final)
        return _build(final, args, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="pip-install the wheel into this interpreter")
    ns = parser.parse_args(argv)
    try:
        wheel = ensure_wheel()
    except WheelError as exc:
        print(f"llama_cpp_wheel: {exc}", file=sys.stderr)
        return 1
    if ns.install:
        rc = subprocess.call(
            [sys.executable, "-m", "pip", "install", "-q", str(wheel)],
            stdout=sys.stderr,
        )
        if rc != 0:
            print(f"llama_cpp_wheel: pip install {wheel} failed (exit {rc})", file=sys.stderr)
            return 1
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
