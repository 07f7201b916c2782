"""Durable, atomic file operations: a reader never sees a half-written file.

Every write that a reader or a restart could see goes through this module: a
temporary sibling is written and fsynced, renamed over the target with
``os.replace``, and the folder is fsynced so the rename itself survives a power
cut. Folders are published the same way (write beside, fsync, rename). A file
that another library writes by name (the GGUF writer) is written the same way
through :func:`writing_file`; loraq's own bytes go through :func:`atomic_write_bytes`.
Both share one temporary-sibling path (:func:`_temporary`), so no module renames a
file into place by hand.

The OS calls go through :data:`ops`, an :class:`FileOps` object. Tests swap it
for one that fails the k-th call (see ``tests/test_faults.py``) to prove the target is
always either the old or the new content.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".loraq-tmp-"


class FileOps:
    """The OS calls durable writes are made of. Swapped in tests to inject faults."""

    def open_write(self, path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def rename(self, src: Path, dst: Path) -> None:
        # os.rename of a folder onto an existing non-empty folder fails (ENOTEMPTY),
        # which is what publishing wants: never merge into what is already there.
        os.rename(src, dst)


ops: FileOps = FileOps()


@contextlib.contextmanager
def use_ops(replacement: FileOps) -> Iterator[FileOps]:
    """Route every durable write through ``replacement`` for the duration."""
    global ops
    previous, ops = ops, replacement
    try:
        yield replacement
    finally:
        ops = previous


def tmp_sibling(target: Path) -> Path:
    return target.with_name(f"{TMP_PREFIX}{target.name}.{uuid.uuid4().hex[:12]}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ops.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = ops.write(fd, view)
        view = view[written:]


@contextlib.contextmanager
def _temporary(target: Path) -> Iterator[Path]:
    """A temporary sibling of ``target`` (its folder made if need be), removed if the block raises.

    The block fills it and renames it over ``target`` (``ops.replace``) as its last step.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(target)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``target`` so that readers see the old or the new bytes."""
    target = Path(target)
    with _temporary(target) as tmp:
        fd = ops.open_write(tmp)
        try:
            _write_all(fd, data)
            ops.fsync(fd)
        finally:
            ops.close(fd)
        ops.replace(tmp, target)
    fsync_dir(target.parent)
    return target


@contextlib.contextmanager
def writing_file(target: str | os.PathLike[str], *,
                 before_replace: Callable[[], None] | None = None) -> Iterator[Path]:
    """A temporary path beside ``target`` for a library that writes a file by name; the block's end puts it in place.

    When the block ends, the file gets the mode a new file gets (0o666 less the umask;
    a library may have made it private), is fsynced, ``before_replace()`` runs (a last
    check of what is about to be replaced: it may raise), and the file is renamed over
    ``target`` and the folder fsynced. Readers see the old file or the whole new one.
    If the block or the check raises, the temporary file is removed and ``target`` is
    untouched.
    """
    target = Path(target)
    with _temporary(target) as tmp:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            ops.fsync(fd)
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace()
        ops.replace(tmp, target)
    fsync_dir(target.parent)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below ``root`` (files written by other libraries)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                ops.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def publish_dir(src: Path, dst: Path, *, synced: bool = False) -> None:
    """Move the finished folder ``src`` to ``dst`` in one rename.

    ``src`` and ``dst`` must be on the same file system. ``dst`` must not exist
    (or be empty); a published folder is never merged into or overwritten.
    ``synced``: the caller has fsynced ``src`` already (``fsync_tree``), outside
    whatever lock it holds around the rename.
    """
    if not synced:
        fsync_tree(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ops.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


@contextlib.contextmanager
def building_dir(target: Path) -> Iterator[Path]:
    """A hidden folder beside ``target`` to fill; leaving the block puts it in ``target``'s place.

    Whatever the block writes must be fsynced before it ends (``fsync_tree``, or a
    checkpoint marker, which fsyncs the files it lists): nothing can see the folder
    before the rename, so its files need no atomic writes of their own.

    The folder appears whole or not at all. An existing ``target`` stays whole until
    the new one is complete on disk; then it steps aside (one rename) and the new one
    takes its place (another); if that fails, the old one is put back. Only a kill
    between those two renames leaves no ``target`` (the old one lies beside it under a
    temporary name); Linux has no portable atomic swap of folders. If the block
    raises, the hidden folder is removed and ``target`` is untouched.
    """
    tmp = tmp_sibling(target)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = None
        if target.exists():
            old = tmp_sibling(target)
            ops.rename(target, old)
        try:
            ops.rename(tmp, target)
        except BaseException:
            if old is not None:
                with contextlib.suppress(OSError):
                    os.rename(old, target)
            raise
        try:
            fsync_dir(target.parent)
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: Path) -> None:
    """Remove a folder so that no reader sees it half-deleted.

    It is renamed to a hidden temporary name first (one atomic step), then deleted.
    """
    if not path.exists():
        return
    doomed = tmp_sibling(path)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete temporary siblings left by writes that a kill cut short."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for child in folder.iterdir():
        if child.name.startswith(TMP_PREFIX):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    child.unlink()
            removed.append(child)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
