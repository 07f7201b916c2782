"""The state database file: how it is opened, checked and created, and how its faults read.

Standard library only. :mod:`.store` opens the file through these and turns every
SQLite error that escapes a transaction into a loraq error with :func:`db_error`:
a damaged file, a full disk, a writer that will not let go, each said in words a
user can act on. A damaged file is never recreated, and the database or a journal
that is a symlink is refused, never followed.

The busy timeout is a parameter here: :data:`loraq.queue.store.BUSY_TIMEOUT_S`
is the one value, read where a store opens or an error is worded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import urllib.parse
import uuid
from pathlib import Path

from ..errors import CorruptStoreError, LoraqError, StoreError, StoreFaultError
from .migrations import MIGRATIONS, statements


def db_error(path: Path, exc: sqlite3.Error, *, busy_timeout_s: float) -> LoraqError | None:
    """The loraq error an SQLite error means for a user, or ``None`` for a bug of ours.

    A damaged file may only show when a query reaches a damaged page, long after it
    was opened; wherever that happens, the user gets the same "damaged, do this"
    message, never a traceback, and never "database is locked".
    """
    text = str(exc)
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        return None
    if "malformed" in text or "not a database" in text or type(exc) is sqlite3.DatabaseError:
        return corrupt_error(path, exc)
    if is_machine_fault(exc):
        return StoreFaultError(f"{path}: cannot write the state database: {text} (a full disk or an I/O error)")
    if isinstance(exc, sqlite3.OperationalError):
        if "locked" in text or "busy" in text:
            return StoreError(f"{path}: another process kept the state database busy for {busy_timeout_s:.0f} s"
                              f"{_lock_holders(path)}")
        return StoreError(f"{path}: cannot use the state database: {text}")
    if isinstance(exc, sqlite3.DatabaseError):
        return StoreError(f"{path}: the state database failed: {text}")
    return None


#: What SQLite and the OS say when the machine, not the data, is at fault.
_FAULT_TEXTS = ("database or disk is full", "disk i/o error", "no space left on device", "disk quota exceeded",
                "file too large")


def is_machine_fault(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the disk is full or failed: no job's fault."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, StoreFaultError):
            return True
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if isinstance(current, (sqlite3.Error, OSError)) and any(t in str(current).lower() for t in _FAULT_TEXTS):
            return True
        current, seen = current.__cause__ or current.__context__, seen + 1
    return False


def _lock_holders(path: Path) -> str:
    """Who holds SQLite's locks on ``path`` (Linux: /proc/locks), as the end of an error message.

    A process frozen inside a write transaction (SIGSTOP, a debugger, a paused VM)
    blocks every writer until it runs again or ends; naming it tells the operator
    what to do.
    """
    try:
        inodes = {(path.parent / f"{path.name}{suffix}").stat().st_ino for suffix in ("", "-shm", "-wal")
                  if (path.parent / f"{path.name}{suffix}").exists()}
        pids = set()
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "POSIX" and fields[3] == "WRITE" and fields[4].isdigit():
                if int(fields[5].rsplit(":", 1)[-1]) in inodes and int(fields[4]) != os.getpid():
                    pids.add(int(fields[4]))
    except (OSError, ValueError):
        return "; another loraq process holds it"
    if not pids:
        return "; another loraq process holds it"
    described = []
    for pid in sorted(pids):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
        except (OSError, IndexError):
            state, cmd = "?", "?"
        frozen = f" and is stopped: continue it (kill -CONT {pid}) or end it" if state in ("T", "t") else ""
        described.append(f"process {pid} ({cmd[:80]}) holds its lock{frozen}")
    return "; " + "; ".join(described)


def corrupt_error(path: Path, exc: BaseException) -> CorruptStoreError:
    return CorruptStoreError(
        f"{path}: the state database is damaged ({exc}); loraq will not touch it. "
        f"Move it aside (mv {path} {path}.damaged) and restore a backup, "
        "or start a new home and submit the queue again"
    )


#: The first 16 bytes of every SQLite database file.
SQLITE_MAGIC = b"SQLite format 3\x00"


def exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise StoreError(f"{path.parent}: is a file, not a folder; give --home (or LORAQ_HOME) a folder") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: cannot be used: {getattr(exc, 'strerror', None) or exc}") from None
    return True


def refuse_links(path: Path) -> None:
    """The database and its journals are the home's own files: a symlink is refused, never followed."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        candidate = path.with_name(path.name + suffix)
        try:
            if candidate.is_symlink():
                raise StoreError(f"{candidate}: is a symlink; loraq keeps its state only in the home's own files "
                                 "(remove the link, or copy the file in)")
        except (OSError, ValueError) as exc:
            raise StoreError(f"{candidate}: cannot be used: {getattr(exc, 'strerror', None) or exc}") from None


def check_header(path: Path) -> None:
    """An existing file must be an SQLite database: SQLite itself would take an empty one for a new store."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(100)
    except IsADirectoryError:
        raise StoreError(f"{path}: is a folder, not loraq's state database") from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the state database: {exc.strerror or exc}") from None
    if not head:
        raise corrupt_error(path, RuntimeError("the file is empty (0 bytes): a disk that filled, or a bad copy"))
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        raise corrupt_error(path, RuntimeError(f"not an SQLite database ({len(head)} bytes read of its header)"))


def create(path: Path) -> None:
    """Make a new, migrated database at ``path``, whole or not at all.

    It is built beside the target and linked into place, so no reader (another
    process opening the home at the same moment) ever sees an empty file; if
    another process got there first, its database is kept.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        reason = "is a file, not a folder" if isinstance(exc, (FileExistsError, NotADirectoryError)) else (
            getattr(exc, "strerror", None) or exc)
        raise StoreError(f"{path.parent}: cannot create the home: {reason}") from None
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StoreError(f"{path}: cannot use WAL mode here")
            conn.execute("BEGIN IMMEDIATE")
            apply_migrations(conn, 0)
            conn.execute("COMMIT")
        finally:
            conn.close()
        with contextlib.suppress(FileExistsError):  # another process created it first: use theirs
            os.link(tmp, path)
        # The new name must survive a power cut before anything is written under it.
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot create the state database: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the state database: {exc.strerror or exc}") from None
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            with contextlib.suppress(OSError):
                leftover.unlink()


def apply_migrations(conn: sqlite3.Connection, version: int) -> None:
    for number in range(version, len(MIGRATIONS)):
        for statement in statements(MIGRATIONS[number]):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number + 1}")


def check_version(path: Path, version: int) -> None:
    """A reader's check of the schema it found: only the one this loraq knows can be read."""
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{path}: made by a newer loraq (schema {version}, this one knows "
            f"{len(MIGRATIONS)}); upgrade loraq"
        )
    if version == 0:
        raise corrupt_error(path, RuntimeError("no loraq schema in it"))
    if version < len(MIGRATIONS):
        raise StoreError(f"{path}: made by an older loraq (schema {version}, this one needs "
                         f"{len(MIGRATIONS)}) and cannot be upgraded here; run loraq once where the home "
                         "is writable")


def connect_readonly(path: Path, *, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection that cannot write; on a read-only folder (no -shm can be made), an immutable one."""
    uri = "file:" + urllib.parse.quote(str(path.absolute()))
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=busy_timeout_s, isolation_level=None)
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        if os.access(path.parent, os.W_OK) and not _read_only_fs(path.parent):
            raise
    # A read-only home: nobody can be writing it, so reading it as immutable is exact.
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=busy_timeout_s, isolation_level=None)


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False

