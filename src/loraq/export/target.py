"""Where an export may write, and what ``--force`` may replace.

An export writes one thing: a merged-model folder or a GGUF file. ``--force`` replaces
only what an earlier export wrote there: a folder holding loraq's export record
(:data:`EXPORT_RECORD`, written into every merged export) or a regular file that starts
with the GGUF magic. Never, whatever the flags: the home or a folder holding it, the
working folder or a folder holding it, the adapter's or its base's folder (or a folder
holding them), anything inside ``adapters/`` or the adapter's folder, a symlink, and
anything that is not a regular file or folder (a device, a FIFO, a socket).

The target is checked after resolving the symlinks of its parent folders (a symlink as
the target itself is refused: a write through it would land elsewhere, or replace the
link), once before any work and again just before the finished export takes its place.

Exports into one folder take turns (an advisory lock on the folder, which the kernel
drops when a process dies); each first removes the hidden ``.loraq-tmp-<name>.*``
siblings that a killed export to the same name left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import fsutil
from ..errors import ExportError, PathError
from ..escape import printable
from ..sandbox import open_regular, read_fd, resolve

#: The record loraq writes into every merged export; its presence is what lets ``--force`` replace the folder.
EXPORT_RECORD = "loraq-export.json"
GGUF_MAGIC = b"GGUF"
KINDS = ("merged", "gguf")
_MAX_RECORD_BYTES = 1 << 20


def resolved_target(dest: str | os.PathLike[str]) -> Path:
    """``dest`` as an absolute path with its parent folders' symlinks followed; a symlink as ``dest`` is refused."""
    given = Path(dest).expanduser()
    if os.path.islink(given):
        raise ExportError(f"{printable(given)} is a symlink; an export never writes through one: name the real path")
    return resolve(given, what="export target")


def check(dest: str | os.PathLike[str], kind: str, *, force: bool, keep: Iterable[tuple[str, Path]] = (),
          no_inside: Iterable[tuple[str, Path]] = ()) -> Path:
    """The path to write ``kind`` at, or :class:`~loraq.errors.ExportError` saying why not.

    Args:
        keep: ``(what, folder)`` pairs the export may neither replace nor hold (the home,
            the working folder, the adapter's and the base's folders).
        no_inside: ``(what, folder)`` pairs it may not write into (``adapters/``, the adapter's folder).
    """
    where = resolved_target(dest)
    for what, folder in keep:
        folder = resolve(folder)
        if folder.is_relative_to(where):
            same = "is" if folder == where else "holds"
            raise ExportError(f"{printable(where)} {same} {what} ({printable(folder)}); an export never replaces it, "
                              "even with --force: choose a new folder or file")
    for what, folder in no_inside:
        folder = resolve(folder)
        if where.is_relative_to(folder):
            raise ExportError(f"{printable(where)} is inside {what} ({printable(folder)}); never export into an "
                              "adapter folder or adapters/")
    replaceable(where, kind, force=force)
    return where


def replaceable(where: Path, kind: str, *, force: bool) -> None:
    """Nothing at ``where``, or (with ``force``) an earlier export of ``kind``; else :class:`ExportError`."""
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ExportError(f"{printable(where)}: {exc.strerror or exc}") from None
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise ExportError(f"{printable(where)} is a symlink; an export never writes through one: name the real path")
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise ExportError(f"{printable(where)} is {_kind_of(mode)}, not an earlier export; an export never replaces "
                          "it, even with --force")
    if kind == "gguf" and stat.S_ISDIR(mode):
        raise ExportError(f"{printable(where)} is a folder; --to gguf writes one file")
    if kind == "merged" and stat.S_ISREG(mode):
        raise ExportError(f"{printable(where)} is a file; --to merged writes a folder")
    if not force:
        raise ExportError(f"{printable(where)} already exists; remove it or pass --force to replace it")
    if kind == "gguf" and not _is_gguf(where):
        raise ExportError(f"{printable(where)} is not a GGUF file (it does not start with {GGUF_MAGIC.decode()}); "
                          "--force replaces only an earlier export: remove it yourself or choose another file")
    if kind == "merged" and not is_merged_export(where):
        raise ExportError(f"{printable(where)} is not a merged model loraq exported (no {EXPORT_RECORD} in it); "
                          "--force replaces only an earlier export: remove it yourself or choose another folder")


def is_merged_export(folder: Path) -> bool:
    """Whether ``folder`` is empty or holds the record loraq writes into every merged export."""
    try:
        with os.scandir(folder) as entries:
            if next(entries, None) is None:
                return True  # an empty folder: nothing to lose
        fd = open_regular(folder / EXPORT_RECORD, what="export record")
    except (OSError, PathError):
        return False
    try:
        record = json.loads(read_fd(fd, _MAX_RECORD_BYTES))
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)
    return isinstance(record, dict) and record.get("loraq_export") == 1 and record.get("kind") == "merged"


def _is_gguf(path: Path) -> bool:
    try:
        fd = open_regular(path, what="GGUF file")
    except PathError:
        return False
    try:
        return read_fd(fd, len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def _kind_of(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file or folder"


_TMP_SUFFIX = r"\.[0-9a-f]{12}"


@contextlib.contextmanager
def writing(where: Path) -> Iterator[list[Path]]:
    """Hold the lock of ``where``'s folder (made if missing) and clear what a killed export to ``where`` left.

    Yields the leftovers removed. The lock is ``flock`` on the folder itself: no file is
    left behind, and a killed holder releases it.
    """
    parent = where.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        leftover = re.compile(re.escape(fsutil.TMP_PREFIX + where.name) + _TMP_SUFFIX)
        removed = []
        for child in parent.iterdir():
            if leftover.fullmatch(child.name):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        child.unlink()
                removed.append(child)
        yield removed
    finally:
        os.close(fd)
