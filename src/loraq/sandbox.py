"""Where loraq may read and write, checked after resolving symlinks.

Reads are allowed only inside the allowed roots: the queue file's folder, the
home, the Hugging Face cache (for hub ids), and roots the operator names
(``--allow-root`` or the home's ``config.yaml``), never roots a queue file names
for itself. (Writes go only inside the home because loraq derives every path it
writes from the home; a queue file names no output paths.) Containment is decided
with ``Path.is_relative_to`` on resolved paths, never with string prefixes, so
``/data-evil`` is not inside ``/data`` and a symlink cannot lead out.

Paths named on the command line are the operator's: the CLI adds them to the roots
for that command (:meth:`Roots.with_read`); the working folder is never a root.

A check on a name is not a check on what is read: a file can be swapped between
the two. :meth:`Roots.open_file` checks the descriptor it returns, and
:func:`check_model_folder` checks every file of a base model folder just before a
library opens them by name; a hub id is loaded from its cache snapshot
(:func:`model_folder`), never looked up as a folder of the working directory.

Pickle files are never loaded: :func:`is_pickle` tells them by suffix.

Each caller reports a refused path as its own domain's error (an export fails with
:class:`~loraq.errors.ExportError`, an inspection with
:class:`~loraq.errors.InspectionError`, ...), with the sandbox's message unchanged:
:func:`path_errors_as` is that mapping, in one place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import NotInCache, PathError
from .escape import printable

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


@contextlib.contextmanager
def path_errors_as(error: Callable[[str], Exception]) -> Iterator[None]:
    """Inside the block, a refused path (:class:`PathError`) raises ``error(message)`` instead.

    ``error`` is the caller's domain error (``ExportError``, ``InspectionError``, ...),
    or a function that words the message for it; the sandbox's message is kept and
    the ``PathError`` is not chained (the message says it all).
    """
    try:
        yield
    except PathError as exc:
        raise error(str(exc)) from None


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
    """The folders loraq may read from.

    ``config`` is the home's ``config.yaml``: an error about a path outside the roots
    says how to allow its folder for good.
    """

    read: tuple[Path, ...]
    config: Path | None = None

    @classmethod
    def of(cls, read: Iterable[Path | str], *, config: Path | None = None) -> Roots:
        return cls(read=tuple(resolve(p) for p in read), config=config)

    def with_read(self, *more: Path | str) -> Roots:
        """These roots and ``more`` (a folder or file named on the command line, trusted for that command)."""
        added = tuple(dict.fromkeys(root for root in (resolve(p) for p in more) if root not in self.read))
        return Roots(read=self.read + added, config=self.config)

    def contains(self, path: Path | str) -> bool:
        resolved = resolve(path)
        return any(resolved.is_relative_to(root) for root in self.read)

    def check_read(self, path: Path | str, *, what: str = "path") -> Path:
        """Return the resolved ``path`` or raise :class:`PathError` if it leaves the roots."""
        resolved = resolve(path, what=what)
        if not any(resolved.is_relative_to(root) for root in self.read):
            permanently = (f", or for good with allow_roots: [DIR] in {self.config}" if self.config is not None
                           else "")
            raise PathError(
                f"{what} {printable(path)!r} resolves to {printable(resolved)}, outside the allowed roots "
                f"({', '.join(printable(r) for r in self.read)}); allow its folder with --allow-root DIR{permanently}"
            )
        return resolved

    def open_file(self, path: Path | str, *, what: str = "file") -> tuple[int, os.stat_result]:
        """Open ``path`` for reading if it is a regular file inside the roots: ``(fd, stat)``.

        The check is made on the descriptor that will be read, not on the name: the
        path is resolved and checked, then opened without following a final symlink
        (``O_NOFOLLOW``) and without blocking on a FIFO (``O_NONBLOCK``); the open file
        must be a regular file, and where the kernel says which file a descriptor is
        (``/proc/self/fd``), that file must be the one checked. A file swapped for a
        symlink, a FIFO or a device after it was checked is refused, never read.

        Raises:
            PathError: outside the roots, not a regular file, swapped while opening,
                or missing or unreadable (the OS's reason, in one line).
        """
        resolved = self.check_read(path, what=what)
        fd = open_regular(resolved, what=what, shown=path)
        try:
            st = os.fstat(fd)
            actual = fd_path(fd)
            if actual is not None and actual != resolved:
                raise PathError(f"{what} {printable(path)!r} changed while it was opened (now {printable(actual)}); "
                                "refused")
        except BaseException:
            os.close(fd)
            raise
        return fd, st


#: Entries of a base model folder that are checked; a model folder holds a few dozen.
MAX_MODEL_ENTRIES = 10_000


def check_model_folder(folder: Path, roots: Roots, *, what: str = "base_model") -> None:
    """Every file in a local model folder is a regular file inside ``roots``, as a dataset must be.

    transformers opens a base folder's files by name (config, tokenizer, weights), so
    each entry is checked where it leads: a symlink out of the roots (``tokenizer.json``
    pointing at a file elsewhere) or a FIFO or device under a model file's name is
    refused before anything loads. Run at submit and again just before each load.

    Raises:
        PathError: an entry that leads outside the roots or is not a regular file or folder.
    """
    seen = 0
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as exc:
            raise PathError(f"{what} {printable(current)}: cannot be listed: {exc.strerror or exc}") from None
        for entry in entries:
            seen += 1
            if seen > MAX_MODEL_ENTRIES:
                raise PathError(f"{what} {printable(folder)} holds more than {MAX_MODEL_ENTRIES:,} entries; "
                                "not a model folder")
            path = Path(entry.path)
            shown = f"{what} file {printable(path.relative_to(folder))}"
            target = roots.check_read(path, what=shown) if entry.is_symlink() else path
            try:
                mode = os.stat(target).st_mode
            except OSError as exc:
                raise PathError(f"{shown}: {exc.strerror or exc}") from None
            if stat.S_ISDIR(mode):
                if not entry.is_symlink():
                    stack.append(path)
            elif not stat.S_ISREG(mode):
                raise PathError(f"{shown} is not a regular file (a FIFO or a device); refused")


#: What loraq fetches of a hub model it must download: configs, tokenizers, safetensors weights. Never pickles.
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")


def model_folder(base: str, roots: Roots, *, revision: str | None = None, download: bool = False) -> Path:
    """The checked local folder a base model loads from: its own folder, or a hub id's snapshot.

    A hub id is never handed to transformers as a name: transformers would first try
    it as a folder relative to the working directory, outside every root. It is looked
    up in the Hugging Face cache (downloading its safetensors, configs and tokenizer
    files only with ``download``), and the snapshot folder is used. Either way the
    folder's files are checked with :func:`check_model_folder` just before the load.

    Raises:
        PathError: outside the roots, not a model folder, not in the cache, or a file
            that leads outside the roots.
    """
    if Path(base).is_absolute():
        folder = roots.check_read(base, what="base_model")
    else:
        folder = _hub_snapshot(base, revision, download=download)
        roots = roots.with_read(hf_cache_dir())
    if not folder.is_dir():
        raise PathError(f"base_model {printable(base)!r}: {printable(folder)} is not a folder")
    check_model_folder(folder, roots)
    return folder


def _hub_snapshot(repo_id: str, revision: str | None, *, download: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=not download,
                                      allow_patterns=list(HUB_FILE_PATTERNS)))
    except Exception as exc:  # noqa: BLE001 -- huggingface_hub raises many types (offline, gated, missing)
        where = "cannot be downloaded" if download else f"is not in the local Hugging Face cache ({hf_cache_dir()})"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        kind = PathError if download else NotInCache
        raise kind(f"base_model {printable(repo_id)!r} {where}: {printable(reason)[:200]}") from None


def resolve(path: Path | str, *, what: str = "path") -> Path:
    """``path`` with ``~`` expanded and symlinks followed, or :class:`PathError` in one line.

    A NUL byte, a component the file system cannot hold (over 255 bytes) and a symlink
    loop are errors about that path, not crashes.
    """
    try:
        return Path(path).expanduser().resolve()
    except ValueError:  # embedded null byte
        raise PathError(f"{what} {printable(path)!r} holds a NUL byte; not a usable path") from None
    except RuntimeError:  # Python 3.11-3.12 report a symlink loop this way
        raise PathError(f"{what} {printable(path)!r} is a symlink loop") from None
    except OSError as exc:
        raise PathError(f"{what} {printable(path)!r}: {exc.strerror or exc}") from None


def open_regular(path: Path, *, what: str = "file", shown: Path | str | None = None) -> int:
    """Open ``path`` read-only if it is a regular file; a final symlink and a FIFO are refused unopened."""
    shown = printable(shown if shown is not None else path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise PathError(f"{what} {shown!r} not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PathError(f"{what} {shown!r} became a symlink after it was checked; refused") from None
        raise PathError(f"{what} {shown!r} cannot be read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
            raise PathError(f"{what} {shown!r} is {kind}; loraq reads regular files only")
        # O_NONBLOCK served the open; reads of a regular file block as usual.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from ``fd``'s current position (fewer if the file ends first)."""
    parts, got = [], 0
    while got < size:
        chunk = os.read(fd, min(size - got, 1 << 24))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def fd_path(fd: int) -> Path | None:
    """The file an open descriptor refers to, where the kernel says (Linux ``/proc``); else ``None``."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return Path(target) if target.startswith("/") else None


#: A Hugging Face hub id, ``name`` or ``org/name``: what a base model is when it is not a path.
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def is_hub_id(value: str) -> bool:
    # fullmatch: '$' would also match before a trailing newline ("org/model\n")
    return HUB_ID_PATTERN.fullmatch(value) is not None
