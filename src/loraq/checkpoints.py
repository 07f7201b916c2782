"""Training checkpoints: when one counts as complete, and which one a retry resumes from.

transformers' ``Trainer`` writes ``checkpoint-N/`` file by file. loraq counts a
checkpoint only once every file in it is fsynced and a marker listing those files
and their sizes has been written last, atomically. A checkpoint cut off by a kill
has no marker (or files that disagree with it) and is skipped.

Torch-free: the supervisor uses it to choose where a retry resumes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import fsutil

MARKER = "loraq-complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_ATTEMPT = re.compile(r"^attempt-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    attempt: int


def mark_complete(folder: Path, *, step: int) -> None:
    fsutil.fsync_tree(folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    fsutil.atomic_write_json(folder / MARKER, {"step": step, "files": files})


def is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        return bool(files) and all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _numbered(folder: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = pattern.match(child.name)
        if match and child.is_dir() and not child.is_symlink():
            found.append((int(match.group(1)), child))
    return sorted(found)


def complete_checkpoints(job_dir: Path) -> list[Checkpoint]:
    """Every complete checkpoint of every attempt of a job, oldest step first."""
    found = []
    for attempt, attempt_dir in _numbered(job_dir, _ATTEMPT):
        for step, folder in _numbered(attempt_dir / "checkpoints", _CHECKPOINT):
            if is_complete(folder):
                found.append(Checkpoint(folder, step, attempt))
    return sorted(found, key=lambda c: (c.step, c.attempt))


def newest_complete(job_dir: Path) -> Checkpoint | None:
    found = complete_checkpoints(job_dir)
    return found[-1] if found else None


def prune(job_dir: Path, keep: int = 2) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints, and every incomplete one
    from attempts other than ``running_attempt``."""
    complete = complete_checkpoints(job_dir)
    doomed = [c.path for c in complete[:-keep]] if keep else [c.path for c in complete]
    for folder in doomed:
        fsutil.remove_tree(folder)
    return doomed


def remove_incomplete(job_dir: Path, *, except_attempt: int | None = None) -> list[Path]:
    """Delete checkpoint folders that never got their marker (cut off by a kill)."""
    removed = []
    for attempt, attempt_dir in _numbered(job_dir, _ATTEMPT):
        if attempt == except_attempt:
            continue
        for _step, folder in _numbered(attempt_dir / "checkpoints", _CHECKPOINT):
            if not is_complete(folder):
                fsutil.remove_tree(folder)
                removed.append(folder)
    return removed


def check_weights(folder: Path) -> str | None:
    """What is wrong with the adapter weights in a checkpoint folder, or ``None``."""
    from .inspector import check_finite

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return f"no adapter_model.safetensors in {folder}"
    return check_finite(path)
