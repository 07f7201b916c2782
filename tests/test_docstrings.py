"""Docstrings name what exists: a module, function or private helper a docstring points at is still there.

A rename leaves the prose behind (``_safetensors`` and ``_inspect_base`` outlived their
code in the inspector's docstring). Every cross-reference (``:mod:`...```, ``:func:`...```,
...) in a docstring of ``src/loraq`` must name something defined in loraq, and so must
every private name (````_name````) and every repository path (``src/.../x.py``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "loraq"
REPO = SRC.parents[1]

ROLE = re.compile(r":(?:mod|func|class|meth|data|attr|exc|obj):`~?([^`<]+?)`")
PRIVATE = re.compile(r"``(_[A-Za-z][A-Za-z0-9_]*)(?:\(\))?``")
REPO_PATH = re.compile(r"\b(?:src|tests|tools|benchmarks)/[\w/]+\.py\b")
#: Names from other projects that docstrings cite on purpose.
FOREIGN = {"transformers", "peft", "torch", "ray", "gguf", "safetensors", "llama_cpp", "openai", "numpy"}


def _defined() -> set[str]:
    """Every module, function, class, attribute and variable name loraq defines."""
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        names.add(path.stem)
        names.add(path.parent.name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[0])
    return names


def _docstrings(tree: ast.Module) -> list[tuple[str, str]]:
    found = [("module", ast.get_docstring(tree) or "")]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append((node.name, ast.get_docstring(node) or ""))
    return found


def test_names_in_docstrings_exist() -> None:
    defined = _defined()
    stale: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(REPO)
        for owner, doc in _docstrings(ast.parse(path.read_text(encoding="utf-8"))):
            for match in ROLE.finditer(doc):
                parts = [p for p in match.group(1).strip().removesuffix("()").split(".") if p]
                if parts and parts[0] not in FOREIGN and not all(p in defined for p in parts):
                    stale.append(f"{where} ({owner}): {match.group(0)}")
            for match in PRIVATE.finditer(doc):
                if not match.group(1).startswith("__") and match.group(1) not in defined:
                    stale.append(f"{where} ({owner}): ``{match.group(1)}``")
            for match in REPO_PATH.finditer(doc):
                if not (REPO / match.group(0)).exists():
                    stale.append(f"{where} ({owner}): {match.group(0)}")
    assert not stale, "docstrings name what no longer exists:\n" + "\n".join(stale)
