"""Where loraq may read and write, checked after resolving symlinks.

Reads are allowed only inside the allowed roots: the queue file's folder, the
home, the Hugging Face cache (for hub ids), and roots the operator names
(``--allow-root`` or the home's ``config.yaml``), never roots a queue file names
for itself. Writes go only inside the home. Containment is decided with
``Path.is_relative_to`` on resolved paths, never with string prefixes, so
``/data-evil`` is not inside ``/data`` and a symlink cannot lead out.

Pickle files are never loaded: :func:`refuse_pickle` names the file instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PathError

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved the way huggingface_hub resolves it."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


@dataclass(frozen=True)
class Roots:
    """The folders loraq may read from and write to."""

    read: tuple[Path, ...]
    write: tuple[Path, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, read: Iterable[Path | str], write: Iterable[Path | str] = ()) -> Roots:
        return cls(
            read=tuple(Path(p).expanduser().resolve() for p in read),
            write=tuple(Path(p).expanduser().resolve() for p in write),
        )

    def with_read(self, *extra: Path | str) -> Roots:
        return Roots.of([*self.read, *extra], self.write)

    def contains(self, path: Path | str) -> bool:
        resolved = Path(path).expanduser().resolve()
        return any(resolved.is_relative_to(root) for root in self.read)

    def check_read(self, path: Path | str, *, what: str = "path") -> Path:
        """Return the resolved ``path`` or raise :class:`PathError` if it leaves the roots."""
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in self.read):
            raise PathError(
                f"{what} {str(path)!r} resolves to {resolved}, outside the allowed roots "
                f"({', '.join(str(r) for r in self.read)}); add one with --allow-root DIR"
            )
        return resolved

    def check_write(self, path: Path | str, *, what: str = "path") -> Path:
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in self.write):
            raise PathError(
                f"{what} {str(path)!r} resolves to {resolved}, outside the writable roots "
                f"({', '.join(str(r) for r in self.write)})"
            )
        return resolved


def refuse_pickle(path: Path) -> None:
    if is_pickle(path):
        raise PathError(
            f"{path}: pickle files ({path.suffix}) are refused and never loaded; "
            "save with safetensors instead"
        )


def inside(child: Path, parent: Path) -> bool:
    """Whether ``child`` resolves (symlinks followed) to a path inside ``parent``."""
    return child.resolve().is_relative_to(parent.resolve())
