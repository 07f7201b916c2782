"""What an export reads besides the adapter's weights: the base model, its config, the job's chat template.

Every file is read through the sandbox: the base folder's files are checked where they
lead (:func:`loraq.sandbox.check_model_folder`: a ``config.json`` symlinked to a file
outside the roots is refused unread), and each file is read from a descriptor checked to
be the regular file inside the roots. An error about a refused file names it, never
what it holds.

An export never touches the network: a hub id is looked up in the local Hugging Face
cache only, and the libraries that load the model run with the hub offline
(:func:`offline`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportError, NotInCache
from ..escape import printable
from ..sandbox import Roots, hf_cache_dir, is_hub_id, model_folder, path_errors_as, read_fd

#: transformers' name for a tokenizer's chat template file; loraq publishes a job's own template under it.
CHAT_TEMPLATE = "chat_template.jinja"
MAX_CONFIG_BYTES = 1 << 20
MAX_TEMPLATE_BYTES = 1 << 20


@dataclass(frozen=True)
class Base:
    """A base model as an export uses it."""

    name: str  # what the result names: the resolved folder, or the hub id
    folder: Path  # the checked local folder its files load from (a hub id's cache snapshot)
    config: dict[str, Any]  # its config.json
    roots: Roots  # the roots its files were checked against (a hub id's: with the cache)


def base_model(name: str, roots: Roots) -> Base:
    """The base model ``name`` (a folder, or a hub id in the local cache), every file of it checked.

    Raises:
        ExportError: not a model folder, outside the roots, a file that leads out of them,
            or a hub id that is not in the local cache (an export never downloads).
    """
    path = Path(name).expanduser()
    hub = not path.exists() and is_hub_id(name)
    if not hub and not path.exists():
        raise ExportError(f"base model {printable(name)!r}: no such folder, and not a hub id")
    with path_errors_as(ExportError):
        try:
            folder = model_folder(name if hub else str(path.absolute()), roots)
        except NotInCache:  # a PathError, worded here before the block maps the others
            raise ExportError(f"base model {printable(name)!r} is not in the local Hugging Face cache "
                              f"({hf_cache_dir()}), and loraq export is offline-only (it never downloads): fetch it "
                              f"first ('hf download {printable(name)}'), or give --base DIR") from None
    if hub:
        roots = roots.with_read(hf_cache_dir())
    config = read_json(folder / "config.json", roots, what=f"base model {printable(name)!r}: config.json")
    return Base(name if hub else str(folder), folder, config, roots)


def read_json(path: Path, roots: Roots, *, what: str) -> dict[str, Any]:
    """A small JSON object read from a checked descriptor; errors name the file, never its content."""
    raw = read_small(path, roots, what=what, limit=MAX_CONFIG_BYTES)
    try:
        data = json.loads(raw)
    except ValueError:
        raise ExportError(f"{what} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ExportError(f"{what} is not a JSON object")
    return data


def optional_json(path: Path, roots: Roots, *, what: str) -> dict[str, Any]:
    """:func:`read_json`, or ``{}`` where there is no such file (a dangling symlink is one, and is refused)."""
    if not os.path.lexists(path):
        return {}
    return read_json(path, roots, what=what)


def read_small(path: Path, roots: Roots, *, what: str, limit: int) -> bytes:
    with path_errors_as(ExportError):
        fd, st = roots.open_file(path, what=what)
    try:
        if st.st_size > limit:
            raise ExportError(f"{what} is {st.st_size:,} bytes, more than the {limit:,} it may be")
        return read_fd(fd, limit)
    finally:
        os.close(fd)


def chat_template(adapter: Path, manifest: dict[str, Any], roots: Roots) -> str | None:
    """The chat template the adapter was trained with, when it is not the base's; ``None``: keep the base's.

    A job with its own ``chat_template`` publishes it beside the adapter
    (``chat_template.jinja``) and names it, with its sha256, in the manifest: the file
    must be there and be that text. An adapter folder without a manifest that holds
    the file is taken to mean it too, as transformers does for a tokenizer folder.
    """
    entry = manifest.get("chat_template")
    path = adapter / CHAT_TEMPLATE
    if not isinstance(entry, dict) and not path.exists():
        return None
    what = f"{printable(adapter.name)}: {CHAT_TEMPLATE}"
    if not path.exists():
        raise ExportError(f"{what} is missing: the job trained with chat template "
                          f"{printable(str(entry.get('name') if isinstance(entry, dict) else ''))!r}, which the "
                          "merged model must ship; restore the file")
    raw = read_small(path, roots, what=what, limit=MAX_TEMPLATE_BYTES)
    want = entry.get("sha256") if isinstance(entry, dict) else None
    if isinstance(want, str) and hashlib.sha256(raw).hexdigest() != want:
        raise ExportError(f"{what} is not the chat template the job trained with (its sha256 differs from the "
                          "manifest's); restore it")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ExportError(f"{what} is not UTF-8 text") from None


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face libraries stay off the network inside the block: an export reads only local files.

    Importing peft imports bitsandbytes, whose kernels check asks the hub about a kernel's
    publisher unless the hub is offline: without this an export looked names up in DNS.
    The environment variables are read when huggingface_hub is imported; where it already
    is, its constant is set too. Both are put back afterwards (a huggingface_hub first
    imported inside the block keeps the hub offline for the rest of the process).
    """
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {key: os.environ.get(key) for key in names}
    constants = sys.modules.get("huggingface_hub.constants")
    before = getattr(constants, "HF_HUB_OFFLINE", None)
    for key in names:
        os.environ[key] = "1"
    if constants is not None:
        setattr(constants, "HF_HUB_OFFLINE", True)  # noqa: B010 -- a module's constant, read where it is used
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if constants is not None and before is not None:
            setattr(constants, "HF_HUB_OFFLINE", before)  # noqa: B010
