"""What libraries print goes to the home's log; loraq's own words keep stdout and stderr.

Dependencies print on import and on load: bitsandbytes and ``kernels`` log that a
faster kernel could not be fetched offline, transformers warns about its own
deprecations, C extensions write straight to file descriptor 2. None of it is
loraq's to say, and a script that reads ``loraq``'s stderr must see only loraq's
one-line errors. While a command runs (:func:`routed`), everything a library can
write — ``print``, :mod:`warnings`, :mod:`logging` (whatever handler it set up),
writes to fds 1 and 2 — lands in a temporary file, and loraq's own lines go
through :func:`out` and :func:`err`, streams on the real stdout and stderr. When
the command ends, what was caught is appended to ``<home>/logs/loraq.log`` (when
the home exists; bounded), where ``loraq`` users look for it.

``LORAQ_DEBUG=1`` leaves everything on the terminal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TextIO

#: The log inside the home, and how much of one command's library output it keeps.
LOG_NAME = "loraq.log"
KEEP_BYTES = 256 * 1024
#: The log is rotated (to loraq.log.1) past this size.
ROTATE_BYTES = 8 * 1024 * 1024

_own: tuple[TextIO, TextIO] | None = None
_home: Path | None = None


def out() -> TextIO:
    """loraq's own stdout: the real one while :func:`routed` is active."""
    return _own[0] if _own is not None else sys.stdout


def err() -> TextIO:
    """loraq's own stderr: the real one while :func:`routed` is active."""
    return _own[1] if _own is not None else sys.stderr


def log_into(home: Path) -> None:
    """Append this command's library output to ``home``'s log (a command whose home is not ``--home``: demo)."""
    global _home
    _home = home


def _own_stream(stream: TextIO, fd: int) -> tuple[TextIO, bool]:
    """A stream that still reaches where ``stream`` went once ``fd`` points at the log (and whether it is new)."""
    try:
        if stream.fileno() != fd:
            return stream, False
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return stream, False  # an in-memory stream (tests): it is not redirected
    stream.flush()
    copy = os.fdopen(os.dup(fd), "w", encoding=stream.encoding or "utf-8", errors=stream.errors or "strict",
                     buffering=1)
    return copy, True


@contextlib.contextmanager
def routed(home: Path | None) -> Iterator[None]:
    """Route every library's output to a temporary file for the block, then into ``home``'s log.

    Nested calls do nothing (the outer one routes).
    """
    global _own, _home
    if _own is not None or os.environ.get("LORAQ_DEBUG"):
        yield
        return
    _home = home
    saved_streams = sys.stdout, sys.stderr
    own_out, new_out = _own_stream(sys.stdout, 1)
    own_err, new_err = _own_stream(sys.stderr, 2)
    caught: IO[bytes] = tempfile.TemporaryFile(prefix="loraq-notices-")
    saved_fds = _redirect_fds(caught.fileno())
    sink = io.TextIOWrapper(os.fdopen(os.dup(caught.fileno()), "wb"), encoding="utf-8", errors="backslashreplace",
                            line_buffering=True)
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_logging = root.level, logging.lastResort, root.handlers[:]
    root.handlers = [handler]  # libraries' records propagate here; none reaches a terminal
    root.setLevel(logging.WARNING)
    logging.lastResort = handler
    logging.captureWarnings(True)
    # Handlers that libraries set up before the command hold the terminal's stream itself.
    terminal = {id(stream) for stream in (*saved_streams, sys.__stdout__, sys.__stderr__) if stream is not None}
    moved = [(h, h.setStream(sink)) for h in _stream_handlers() if id(h.stream) in terminal]
    sys.stdout = sys.stderr = sink
    _own = (own_out, own_err)
    try:
        yield
    finally:
        _own = None
        sys.stdout, sys.stderr = saved_streams
        for moved_handler, stream in moved:
            if stream is not None:
                moved_handler.setStream(stream)
        logging.captureWarnings(False)
        root.setLevel(saved_logging[0])
        logging.lastResort = saved_logging[1]
        root.handlers = saved_logging[2]
        with contextlib.suppress(Exception):
            sink.flush()
        _restore_fds(saved_fds)
        for stream, new in ((own_out, new_out), (own_err, new_err)):
            with contextlib.suppress(Exception):
                stream.flush()
                if new:
                    stream.close()
        with contextlib.suppress(Exception):
            sink.close()
        _keep(caught, _home)
        _home = None


def _stream_handlers() -> list[logging.StreamHandler[TextIO]]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    # logging's own last-resort handler reads sys.stderr when it writes (its stream cannot be set).
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and not isinstance(getattr(type(h), "stream", None), property)]


def _redirect_fds(target: int) -> list[tuple[int, int]]:
    saved = []
    for fd in (1, 2):
        try:
            saved.append((fd, os.dup(fd)))
            os.dup2(target, fd)
        except OSError:  # no such descriptor (a daemon): nothing to route
            continue
    return saved


def _restore_fds(saved: list[tuple[int, int]]) -> None:
    for fd, copy in saved:
        with contextlib.suppress(OSError):
            os.dup2(copy, fd)
            os.close(copy)


def _keep(caught: IO[bytes], home: Path | None) -> None:
    """Append the tail of what was caught to the home's log; a home that cannot take it loses only the notices."""
    try:
        size = caught.seek(0, os.SEEK_END)
        if size == 0 or home is None or not home.is_dir():
            return
        caught.seek(max(0, size - KEEP_BYTES))
        text = caught.read()
        logs = home / "logs"
        logs.mkdir(exist_ok=True)
        path = logs / LOG_NAME
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > ROTATE_BYTES:
                os.replace(path, logs / f"{LOG_NAME}.1")
        header = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} loraq {' '.join(sys.argv[1:])[:500]}"
        cut = f" (the first {size - KEEP_BYTES} bytes left out)" if size > KEEP_BYTES else ""
        with open(path, "ab") as log:
            log.write(f"{header}{cut}\n".encode("utf-8", "backslashreplace") + text.rstrip(b"\n") + b"\n")
    except OSError:
        pass  # a full disk or a read-only home: the command's own result matters more than its notices
    finally:
        caught.close()
