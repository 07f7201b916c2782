"""Where loraq may read and write, checked after resolving symlinks.

Reads are allowed only inside the allowed roots: the queue file's folder, the
home, the Hugging Face cache (for hub ids), and roots the operator names
(``--allow-root`` or the home's ``config.yaml``), never roots a queue file names
for itself. (Writes go only inside the home because loraq derives every path it
writes from the home; a queue file names no output paths.) Containment is decided
with ``Path.is_relative_to`` on resolved paths, never with string prefixes, so
``/data-evil`` is not inside ``/data`` and a symlink cannot lead out.

Pickle files are never loaded: :func:`is_pickle` tells them by suffix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
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
    """The folders loraq may read from."""

    read: tuple[Path, ...]

    @classmethod
    def of(cls, read: Iterable[Path | str]) -> Roots:
        return cls(read=tuple(Path(p).expanduser().resolve() for p in read))

    def contains(self, path: Path | str) -> bool:
        resolved = Path(path).expanduser().resolve()
        return any(resolved.is_relative_to(root) for root in self.read)

    def check_read(self, path: Path | str, *, what: str = "path") -> Path:
        """Return the resolved ``path`` or raise :class:`PathError` if it leaves the roots."""
        if not self.contains(path):
            raise PathError(
                f"{what} {str(path)!r} resolves to {Path(path).expanduser().resolve()}, outside the allowed roots "
                f"({', '.join(str(r) for r in self.read)}); add one with --allow-root DIR"
            )
        return Path(path).expanduser().resolve()


#: A Hugging Face hub id, ``name`` or ``org/name``: what a base model is when it is not a path.
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_hub_id(value: str) -> bool:
    return HUB_ID_PATTERN.match(value) is not None
