"""Uploaded training files: checked in full as ``submit`` checks a dataset, then kept content-addressed.

An upload is streamed to a temporary file inside ``<home>/files/`` (never into
memory), every row is checked with the dataset reader that ``submit`` uses (format,
each row, the home's limits), and only then is it moved to ``<home>/files/<sha256>.<kind>``.
The name the client gives is only a label: no request ever names a path.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import api
from ..data import ReadLimits, check_dataset
from ..data.rows import SUFFIXES, RowProblem
from ..errors import DataError, NotFoundError
from ..escape import excerpt
from ..fsutil import fsync_dir
from ..queue.records import COMPLETED
from ..workspace import Home
from .errors import ApiError, bad_request, too_large
from .state import ApiState, StoredFile

PURPOSES = ("fine-tune",)
CHUNK = 1 << 20
#: Row problems named in one refusal (the client shows one message).
SHOWN = 5


def files_dir(home: Home) -> Path:
    return home.root / "files"


def blob_path(home: Home, stored: StoredFile) -> Path:
    return files_dir(home) / stored.blob


def kind_of(filename: str) -> str:
    """How to read an upload: by its name's suffix where loraq knows it, else JSON Lines (OpenAI's format)."""
    suffix = Path(filename).suffix.lower()
    return suffix.lstrip(".") if suffix in SUFFIXES else "jsonl"


def save_upload(home: Home, state: ApiState, *, key_id: int, filename: str, purpose: str, chunks: Iterable[bytes],
                max_bytes: int) -> StoredFile:
    """Stream ``chunks`` to the home, check every row, keep it under its hash; raise :class:`ApiError` with the rows named."""
    if purpose not in PURPOSES:
        raise bad_request(f"purpose {excerpt(purpose)}: this server accepts only {', '.join(PURPOSES)}", "purpose",
                          "invalid_purpose")
    label = filename or "upload"
    kind = kind_of(label)
    folder = files_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".incoming-{secrets.token_hex(8)}.{kind}"
    digest = hashlib.sha256()
    size = 0
    try:
        with open(temp, "xb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(max_bytes, "upload")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        try:
            limits = ReadLimits.of(home.config().limits)
        except DataError:
            limits = ReadLimits()
        dataset, problems = check_dataset(temp, None, limits=limits)
        if problems.count or dataset is None:
            raise refusal(label, problems.problems())
        sha = digest.hexdigest()
        target = folder / f"{sha}.{kind}"
        os.replace(temp, target)  # the same content is the same file: replacing it changes nothing
        fsync_dir(folder)
        return state.add_file(key_id=key_id, sha256=sha, filename=label[:255], size=size, purpose=purpose,
                              fmt=dataset.format, kind=kind, rows=len(dataset))
    finally:
        temp.unlink(missing_ok=True)


def delete(home: Home, state: ApiState, file_id: str, key_id: int) -> StoredFile:
    """Delete a file (``DELETE /v1/files/{id}``): it is gone from the API at once, and its content from the home as soon
    as no other file has the same content and every job trained on it has completed (a pending, running, failed or
    cancelled job may still run, or be retried, and reads it). Content kept for such a job goes with a later delete."""
    stored = state.delete_file(file_id, key_id)
    purge(home, state)
    return stored


def purge(home: Home, state: ApiState) -> list[str]:
    """Remove the content of deleted files that no file and no unfinished job needs; the names removed."""
    removed: list[str] = []
    candidates = state.unheld_blobs()
    if not candidates:
        return removed
    unfinished: set[int] = set()
    if any(job_ids for _, job_ids in candidates):
        with api.open_reader(home) as store:
            for _, job_ids in candidates:
                for job_id in job_ids:
                    try:
                        if store.job(job_id).status != COMPLETED:
                            unfinished.add(job_id)
                    except NotFoundError:
                        pass  # a job removed from the home needs nothing
    for blob, job_ids in candidates:
        if not unfinished.isdisjoint(job_ids):
            continue
        path = files_dir(home) / blob
        if path.exists():
            path.unlink()
            removed.append(blob)
    if removed:
        fsync_dir(files_dir(home))
    return removed


def refusal(label: str, problems: list[Any]) -> ApiError:
    """One 400 naming the first problems by line and field, as OpenAI's file validation does."""
    lines = []
    for problem in problems[:SHOWN]:
        where = f"line {problem.line}" if isinstance(problem, RowProblem) and problem.line else label
        lines.append(f"{where}: {problem.message}")
    more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
    first = problems[0] if problems else None
    param = f"line {first.line}" if isinstance(first, RowProblem) and first.line else "file"
    return bad_request(f"Invalid file {excerpt(label, 80)}: " + "; ".join(lines) + more, param, "invalid_file_format")


def file_json(stored: StoredFile) -> dict[str, Any]:
    return {"object": "file", "id": stored.id, "bytes": stored.bytes, "created_at": int(stored.created_at),
            "filename": stored.filename, "purpose": stored.purpose, "status": "processed", "status_details": None,
            "expires_at": None}


def read_blob(home: Home, stored: StoredFile) -> bytes:
    """The stored content (its name is its hash and a known suffix: nothing a request wrote)."""
    fd = os.open(blob_path(home, stored), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        return fh.read()
