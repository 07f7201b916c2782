"""Training checkpoints: when one counts as complete, and which one a retry resumes from.

transformers' ``Trainer`` writes ``checkpoint-N/`` file by file. loraq counts a
checkpoint only once every file in it is fsynced and a marker listing those files
and their sizes has been written last, atomically. A checkpoint cut off by a kill
has no marker (or files that disagree with it) and is skipped.

Torch-free: the supervisor uses it to choose where a retry resumes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import fsutil
from .workspace import ADAPTER_WEIGHTS

MARKER = "loraq-complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_ATTEMPT = re.compile(r"^attempt-(\d+)$")


def checkpoint_name(step: int) -> str:
    """``checkpoint-<step>``: the folder name transformers' ``Trainer`` gives a checkpoint."""
    return f"checkpoint-{step}"


def step_of(folder: str | Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder; ``None`` for any other name."""
    match = _CHECKPOINT.match(Path(folder).name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    attempt: int


def _files(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` (relative name -> size), but the marker and temporary files."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != MARKER and not path.name.startswith(fsutil.TMP_PREFIX):
            found[path.relative_to(folder).as_posix()] = path.stat().st_size
    return found


def mark_complete(folder: Path, *, step: int) -> None:
    """Declare ``folder`` complete: fsync all of it, then write the marker, atomically, last."""
    fsutil.fsync_tree(folder)
    fsutil.atomic_write_json(folder / MARKER, {"step": step, "files": _files(folder)})


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
    """Delete all but the ``keep`` newest complete checkpoints of a job (any attempt)."""
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


def snapshot_for_resume(job_dir: Path, into: Path) -> Checkpoint | None:
    """A private, complete copy of the newest complete checkpoint of any attempt, in ``into``.

    The copy is made of hard links (no bytes copied; a plain copy where links are
    not possible), so a trainer of an earlier attempt that is still alive (its
    worker was paused past its lease) or a prune can delete the original while this
    attempt loads it. A checkpoint that vanishes or changes while being linked is
    skipped for the next older one. ``None``: nothing to resume from, start at step 0.
    """
    failure: OSError | None = None
    for candidate in reversed(complete_checkpoints(job_dir)):
        target = into / candidate.path.name
        try:
            if target.exists():
                fsutil.remove_tree(target)
            _link_tree(candidate.path, target)
            if is_complete(target):
                return Checkpoint(target, candidate.step, candidate.attempt)
        except OSError as exc:
            failure = exc
        with contextlib.suppress(OSError):
            fsutil.remove_tree(target)
    if failure is not None and not complete_checkpoints(job_dir):
        return None  # every checkpoint vanished while we looked: nothing left to resume from
    if failure is not None:
        raise failure  # the checkpoints are there but cannot be read: an I/O problem, retry later
    return None


def link_tree(source: Path, target: Path) -> None:
    """``target``: a complete copy of folder ``source`` made of hard links (plain copies where links cannot be)."""
    _link_tree(source, target)


def _link_tree(source: Path, target: Path) -> None:
    with fsutil.building_dir(target) as tmp:
        for dirpath, _dirnames, filenames in os.walk(source):
            rel = Path(dirpath).relative_to(source)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for name in filenames:
                try:
                    os.link(Path(dirpath) / name, tmp / rel / name)
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
                    shutil.copy2(Path(dirpath) / name, tmp / rel / name)
        fsutil.fsync_tree(tmp)


def check_weights(folder: Path) -> str | None:
    """What is wrong with the adapter weights in a checkpoint folder, or ``None``."""
    from .inspect.safetensors import check_finite

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        return f"no {ADAPTER_WEIGHTS} in {folder}"
    return check_finite(path)
