"""One definition of each shared piece: no module writes its own copy of what another module owns.

Each test reads the source (``ast``) and names the place that owns the piece: a
slot's fields change only through :class:`loraq.executors.base.Slot`'s methods; a
refused path becomes a domain error through :func:`loraq.sandbox.path_errors_as`; a
file is put in place atomically only by :mod:`loraq.fsutil`; safetensors bytes are
parsed only by :mod:`loraq.inspect.safetensors`, the bounded reader.
"""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

from loraq.executors.base import Slot

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "loraq"


def _modules(*folders: Path) -> list[tuple[str, ast.Module]]:
    return [(str(path.relative_to(ROOT)), ast.parse(path.read_text(encoding="utf-8")))
            for folder in folders for path in sorted(folder.rglob("*.py"))]


def test_slot_fields_are_written_only_by_slot_methods() -> None:
    owned = {f.name for f in fields(Slot)} - {"index", "device"}
    writes = []
    for where, tree in _modules(SRC, ROOT / "tests"):
        for node in ast.walk(tree):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for part in ast.walk(target):
                    if (isinstance(part, ast.Attribute) and part.attr in owned and isinstance(part.value, ast.Name)
                            and part.value.id.endswith("slot") and where != "src/loraq/executors/base.py"):
                        writes.append(f"{where}:{part.lineno}: {part.value.id}.{part.attr}")
    assert not writes, "a Slot field written outside Slot's methods:\n" + "\n".join(writes)


def test_a_refused_path_becomes_a_domain_error_in_one_place() -> None:
    """``except PathError as exc: raise XError(str(exc)) from None`` is :func:`loraq.sandbox.path_errors_as`'s."""
    copies = []
    for where, tree in _modules(SRC):
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ExceptHandler) and isinstance(node.type, ast.Name)
                    and node.type.id == "PathError" and node.name and where != "src/loraq/sandbox.py"):
                continue
            for statement in node.body:
                if (isinstance(statement, ast.Raise) and isinstance(statement.exc, ast.Call)
                        and any(isinstance(arg, ast.Call) and ast.unparse(arg) == f"str({node.name})"
                                for arg in statement.exc.args)):
                    copies.append(f"{where}:{statement.lineno}: {ast.unparse(statement)}")
    assert not copies, "map a PathError with sandbox.path_errors_as, not by hand:\n" + "\n".join(copies)


def _calls(where_not: str, *names: str) -> list[str]:
    found = []
    for where, tree in _modules(SRC):
        if where == where_not:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                if any(called == name or called.endswith("." + name) for name in names):
                    found.append(f"{where}:{node.lineno}: {called}")
    return found


def test_files_are_put_in_place_atomically_only_by_fsutil() -> None:
    """A temporary sibling renamed into place is fsutil's (``writing_file``, ``atomic_write_bytes``), not by hand."""
    by_hand = _calls("src/loraq/fsutil.py", "tmp_sibling", "ops.replace", "ops.fsync", "ops.open_write")
    assert not by_hand, "write through fsutil.writing_file / atomic_write_bytes:\n" + "\n".join(by_hand)


def test_safetensors_bytes_are_parsed_only_by_the_bounded_reader() -> None:
    """The header length and the values are decoded in one module, the one that checks them first."""
    by_hand = [call for call in _calls("src/loraq/inspect/safetensors.py", "int.from_bytes", "np.frombuffer",
                                       "numpy.frombuffer")
               if "safetensors" in (ROOT / call.split(":")[0]).read_text(encoding="utf-8")]
    assert not by_hand, "read safetensors with loraq.inspect.safetensors:\n" + "\n".join(by_hand)
