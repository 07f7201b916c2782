"""One definition of each shared piece: no module writes its own copy of what another module owns.

Each test reads the source (``ast``) and names the place that owns the piece:
a slot's fields change only through :class:`loraq.executors.base.Slot`'s methods.
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
