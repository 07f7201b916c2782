"""A safetensors file read defensively: the header by hand with bounds, then the values in one pass.

The inspector reads files it did not write, so nothing here trusts the file. The
header is parsed by loraq before any tensor is touched: the 8-byte length must fit
the file and a cap, the JSON must be a UTF-8 object without duplicate keys or
``NaN`` literals, every entry needs a known dtype, a shape of non-negative ints and
a span whose length is dtype size x element count, and the spans must tile the
data region exactly, as the safetensors reference loader requires. A hostile
header is rejected in bounded time and memory: the claimed length is checked
against the cap and the file size before anything is read.

Values are read once, sequentially, in fixed-size chunks into one reused buffer
(memory stays flat whatever the file size). :func:`read_arrays` reads them as
float32 arrays instead, for a caller that needs the numbers (the GGUF export): the
same checked header, one pass in offset order, memory in proportion to the file. Not ``mmap``: a file that shrinks
under a mapping raises SIGBUS and kills the process, and the inspector must never
crash on a hostile folder. Floats are checked on their bit patterns, so BF16 needs
no conversion: the largest magnitude bit pattern (sign bit off) says both whether
any value is non-finite (it reaches the all-ones exponent) and whether any value
is non-zero (it is above 0). Two integer max-reductions find it without writing a
temporary: the unsigned maximum is the largest negative magnitude (with its sign
bit) when there is a negative value, the signed maximum the largest positive one.

numpy only: the supervisor runs this and never imports torch.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The reference implementation's own cap on the header (safetensors ``MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000
#: Far more tensors than any adapter has (a 64-expert MoE with every projection is ~25k).
MAX_ENTRIES = 200_000
#: Dimensions per tensor; real weights have at most 5.
MAX_DIMS = 16
#: Characters in a tensor name; real ones have about a hundred. Names are matched
#: against the config's regexes, so their length bounds that work too.
MAX_NAME_CHARS = 1024
#: Bytes read per chunk when scanning values: small enough to stay in the CPU cache
#: while numpy passes over it, large enough that the per-read cost vanishes.
CHUNK_BYTES = 1 << 20

#: Bits per element of every dtype safetensors defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

#: Float dtypes whose values are checked: (integer width in bytes, first non-finite magnitude pattern).
_FLOAT_BITS: dict[str, tuple[int, int]] = {
    "F16": (2, 0x7C00),
    "BF16": (2, 0x7F80),
    "F32": (4, 0x7F80_0000),
    "F64": (8, 0x7FF0_0000_0000_0000),
}
FLOAT_DTYPES = frozenset(_FLOAT_BITS)


@dataclass(frozen=True)
class Defect:
    """One thing wrong with a file, with the inspector's finding code."""

    code: str
    message: str


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets inside the data region, which starts after the header
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    """What a safetensors header says, once it has been checked."""

    header_len: int
    file_size: int
    tensors: list[TensorInfo]  # valid entries, sorted by offset
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


@dataclass(frozen=True)
class Values:
    """What one pass over a float tensor found."""

    finite: bool
    nonzero: bool
    max_abs: float  # inf or nan when not finite


class _HeaderRejected(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading only if it is a regular file, without following a final symlink.

    ``O_NONBLOCK`` keeps a FIFO planted under the expected name from blocking the
    open forever; the type is then checked on the open descriptor, not the name.

    Raises:
        OSError: cannot be opened, or is not a regular file (``errno`` 0).
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_at(fd: int, offset: int, size: int) -> bytes:
    """Exactly ``size`` bytes at ``offset``, or fewer if the file ends first."""
    parts, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_header(fd: int, file_size: int, *, max_header_bytes: int = MAX_HEADER_BYTES,
                max_entries: int = MAX_ENTRIES) -> tuple[Header | None, list[Defect]]:
    """Parse and check the header of the safetensors file open on ``fd``.

    Returns:
        ``(header, defects)``. ``header`` is ``None`` when the header cannot be
        parsed at all; otherwise it lists the entries that are well formed, and
        ``defects`` says what is wrong with the rest and with the layout.
    """
    if file_size < 8:
        return None, [Defect("truncated", f"the file has {file_size} bytes; a safetensors file starts with an "
                                          "8-byte header length")]
    header_len = int.from_bytes(read_at(fd, 0, 8), "little")
    if header_len > max_header_bytes:
        return None, [Defect("header_too_large", f"the header claims {header_len:,} bytes, over the "
                                                 f"{max_header_bytes:,}-byte cap; not safetensors, or a hostile file")]
    if header_len > file_size - 8:
        return None, [Defect("truncated", f"the header claims {header_len:,} bytes but only {file_size - 8:,} follow "
                                          "the length; the file is cut short or not safetensors")]
    raw = read_at(fd, 8, header_len)
    if len(raw) != header_len:
        return None, [Defect("truncated", "the file shrank while its header was read")]
    try:
        header = _parse(raw, max_entries)
    except _HeaderRejected as exc:
        return None, [Defect(exc.code, str(exc))]
    return _check_entries(header, header_len, file_size)


def _parse(raw: bytes, max_entries: int) -> dict[str, Any]:
    # A cheap count before parsing, so a header of a million entries is refused
    # without building a million dicts; the exact count is checked after parsing.
    if raw.count(b'"data_offsets"') > max_entries:
        raise _HeaderRejected("header_too_many_entries", f"the header has more than {max_entries:,} entries")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _HeaderRejected("header_not_json", f"the header is not UTF-8 (byte {exc.start}); "
                                                 "not a safetensors file") from None

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            for text_value in (key, value) if isinstance(value, str) else (key,):
                try:
                    text_value.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate from a \u escape: the reference loader refuses it
                    raise _HeaderRejected("header_not_json", "the header holds a \\u escape that is not a "
                                                             "character (a lone surrogate)") from None
            if key in out:
                raise _HeaderRejected("header_duplicate_key", f"the header names {key[:200]!r} twice; "
                                                              "readers disagree on which one counts")
            out[key] = value
        return out

    def no_constants(name: str) -> Any:
        raise _HeaderRejected("header_not_json", f"the header contains {name}, which is not JSON")

    try:
        parsed = json.loads(text, object_pairs_hook=pairs_hook, parse_constant=no_constants)
    except _HeaderRejected:
        raise
    except RecursionError:
        raise _HeaderRejected("header_not_json", "the header JSON is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError included
        raise _HeaderRejected("header_not_json", f"the header is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(parsed, dict):
        raise _HeaderRejected("header_not_object", f"the header is a JSON {type(parsed).__name__}, not an object "
                                                   "mapping tensor names to entries")
    if not raw.startswith(b"{"):  # the reference loader refuses anything before the brace
        raise _HeaderRejected("header_not_json", "the header must start with '{'")
    if len(parsed) > max_entries + 1:
        raise _HeaderRejected("header_too_many_entries", f"the header has {len(parsed):,} entries, over the "
                                                         f"{max_entries:,} cap")
    return parsed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, entry: Any) -> TensorInfo | Defect:
    where = f"tensor {name[:200]!r}"
    if len(name) > MAX_NAME_CHARS:
        return Defect("header_bad_entry", f"{where}...: a name of {len(name):,} characters "
                                          f"(at most {MAX_NAME_CHARS:,})")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        keys = sorted(entry)[:6] if isinstance(entry, dict) else type(entry).__name__
        return Defect("header_bad_entry", f"{where}: entry must have exactly dtype, shape, data_offsets (has {keys})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        return Defect("bad_dtype", f"{where}: unknown dtype {str(dtype)[:40]!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(d) and d >= 0 for d in shape)):
        return Defect("header_bad_entry", f"{where}: shape {str(shape)[:80]} is not a list of at most "
                                          f"{MAX_DIMS} non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        return Defect("header_bad_entry", f"{where}: data_offsets {str(offsets)[:80]} is not [begin, end] with "
                                          "0 <= begin <= end")
    count = 1
    for dim in shape:
        count *= dim  # Python ints: a hostile shape cannot overflow
    bits = count * DTYPE_BITS[dtype]
    begin, end = offsets
    if bits % 8 or bits // 8 != end - begin:
        return Defect("span_mismatch", f"{where}: {dtype} {tuple(shape)} needs {bits / 8:,.0f} bytes but its "
                                       f"data_offsets span {end - begin:,}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_entries(parsed: dict[str, Any], header_len: int, file_size: int) -> tuple[Header, list[Defect]]:
    defects: list[Defect] = []
    metadata: dict[str, str] = {}
    tensors: list[TensorInfo] = []
    for name, entry in parsed.items():
        if name == "__metadata__":
            if isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values()):
                metadata = entry
            else:
                defects.append(Defect("bad_metadata", "__metadata__ must map strings to strings; the reference "
                                                      "loader refuses this file"))
            continue
        result = _entry(name, entry)
        (defects if isinstance(result, Defect) else tensors).append(result)  # type: ignore[arg-type]
    tensors.sort(key=lambda t: (t.begin, t.end))
    if not defects:  # with entries left out, the layout would show holes that are not there
        defects.extend(_layout(tensors, file_size - 8 - header_len))
    return Header(header_len, file_size, tensors, metadata), defects


def _layout(tensors: list[TensorInfo], data_len: int) -> list[Defect]:
    """The spans must tile ``[0, data_len)``: no overlap, no hole, nothing outside."""
    defects, pos, previous, tiled = [], 0, None, True
    for t in tensors:
        if t.begin < pos:
            defects.append(Defect("span_overlap", f"tensor {t.name[:200]!r} (bytes {t.begin:,}-{t.end:,}) overlaps "
                                                  f"{previous!r}; a file must store each byte once"))
            tiled = False
        elif t.begin > pos:
            defects.append(Defect("span_gap", f"{t.begin - pos:,} bytes before tensor {t.name[:200]!r} belong to no "
                                              "tensor; the reference loader refuses holes"))
            tiled = False
        if t.end > pos:
            pos, previous = t.end, t.name[:200]
    if pos > data_len:
        if tiled:
            defects.append(Defect("truncated", f"the tensors need {pos:,} bytes of data but the file holds "
                                               f"{data_len:,}; it is cut short by {pos - data_len:,} bytes"))
        else:
            for t in tensors:
                if t.end > data_len:
                    defects.append(Defect("span_out_of_bounds", f"tensor {t.name[:200]!r} ends at byte {t.end:,} of a "
                                                                f"{data_len:,}-byte data region"))
    elif pos < data_len:
        defects.append(Defect("span_gap", f"{data_len - pos:,} bytes after the last tensor belong to no tensor; "
                                          "the reference loader refuses such files"))
    return defects


def scan_values(fd: int, header: Header, names: Iterable[str] | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> tuple[dict[str, Values], list[Defect]]:
    """Read every float tensor (or only ``names``) once, in offset order.

    The header must have passed :func:`read_header` without layout defects.

    Returns:
        ``(values, defects)``: per tensor what its values are like, and
        ``truncated`` if the file shrank while being read.
    """
    import numpy as np

    wanted = None if names is None else set(names)
    floats = [t for t in header.tensors if t.dtype in _FLOAT_BITS and (wanted is None or t.name in wanted)]
    found = {t.name: Values(finite=True, nonzero=False, max_abs=0.0) for t in floats if not t.nbytes}
    todo = [t for t in floats if t.nbytes]
    if not todo:
        return found, []
    chunk_bytes = max(8, min(chunk_bytes, max(t.nbytes for t in todo)))
    chunk_bytes -= chunk_bytes % 8
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    for t in todo:
        width, first_bad = _FLOAT_BITS[t.dtype]
        unsigned, signed = np.dtype(f"<u{width}"), np.dtype(f"<i{width}")
        sign = 1 << (8 * width - 1)
        top, pos, end = 0, header.data_start + t.begin, header.data_start + t.end
        while pos < end:
            size = min(chunk_bytes, end - pos)
            if _fill(fd, view[:size], pos) < size:
                return found, [Defect("truncated", f"the file shrank while tensor {t.name[:200]!r} was read")]
            bits = np.frombuffer(buffer, dtype=unsigned, count=size // width)
            top = max(top, int(bits.max()) & (sign - 1), int(bits.view(signed).max()))
            del bits  # the buffer is reused; no view may outlive this chunk
            pos += size
        found[t.name] = Values(finite=top < first_bad, nonzero=top > 0, max_abs=_as_float(t.dtype, top))
    return found, []


def read_arrays(fd: int, header: Header) -> tuple[dict[str, Any], list[Defect]]:
    """Every float tensor's values as a float32 numpy array of its shape, read once in offset order.

    The header must have passed :func:`read_header` without defects, so every span lies
    inside the file and its size matches its dtype and shape; tensors of other dtypes
    are left out (the caller refuses them by name). BF16 is widened by hand: it is the
    top half of a float32, and numpy has no bfloat16.

    Returns:
        ``(arrays, defects)``: ``truncated`` if the file shrank while being read.
    """
    import numpy as np

    arrays: dict[str, Any] = {}
    for t in header.tensors:
        if t.dtype not in _FLOAT_BITS:
            continue
        raw = bytearray(t.nbytes)
        if _fill(fd, memoryview(raw), header.data_start + t.begin) < t.nbytes:
            return arrays, [Defect("truncated", f"the file shrank while tensor {t.name[:200]!r} was read")]
        if t.dtype == "BF16":
            values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(raw, dtype=f"<f{_FLOAT_BITS[t.dtype][0]}").astype(np.float32)
        arrays[t.name] = values.reshape(t.shape)
    return arrays, []


def _fill(fd: int, target: memoryview, offset: int) -> int:
    got = 0
    while got < len(target):
        n = os.preadv(fd, [target[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got


def _as_float(dtype: str, bits: int) -> float:
    import numpy as np

    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])
    width = _FLOAT_BITS[dtype][0]
    float_type = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]
    return float(np.array([bits], dtype=f"<u{width}").view(float_type)[0])


def check_finite(path: Path) -> str | None:
    """What is wrong with one safetensors file's structure or values, in one line; ``None`` if nothing.

    Run on every training checkpoint, so a run that diverged stops at once
    instead of training on NaN for hours.
    """
    path = Path(path)
    try:
        fd, stat_result = open_regular(path)
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or 'not a regular file'})"
    try:
        if stat_result.st_size == 0:
            return f"{path}: 0 bytes; the save was cut off"
        header, defects = read_header(fd, stat_result.st_size)
        if header is None or defects:
            return f"{path}: {defects[0].message}"
        if not header.tensors:
            return f"{path}: holds no tensors"
        values, defects = scan_values(fd, header)
        if defects:
            return f"{path}: {defects[0].message}"
        bad = [name for name, v in values.items() if not v.finite]
        if bad:
            return (f"{path}: NaN or Inf in {len(bad)} tensor(s), first {bad[0]!r}; training diverged: "
                    "lower the learning rate")
        return None
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    finally:
        os.close(fd)
