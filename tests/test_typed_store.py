"""What is stored comes back as a type (STYLE 12, issue 21): the stored job is read by attribute outside
``queue/``, and halving keeps no sentinel and no state names outside ``queue/records.py``."""

from __future__ import annotations

import ast
from pathlib import Path

from loraq.queue.records import HALVING_KIND, ROUND_STATES

SRC = Path(__file__).resolve().parents[1] / "src" / "loraq"


def _modules(*, outside: str) -> list[tuple[str, ast.AST]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if not rel.startswith(outside):
            out.append((rel, ast.parse(path.read_text(encoding="utf-8"), filename=rel)))
    return out


def _is_spec(node: ast.AST) -> bool:
    """``x.spec`` (a job's stored spec) or a name ``stored``/``spec`` that holds one."""
    return (isinstance(node, ast.Attribute) and node.attr == "spec") or (
        isinstance(node, ast.Name) and node.id in ("spec", "stored"))


def test_no_module_outside_queue_reads_the_stored_job_by_key() -> None:
    found = []
    for rel, tree in _modules(outside="queue/"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and _is_spec(node.value):
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "get" and _is_spec(node.func.value)):
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Attribute) and node.attr == "of_stored" and rel != "protocol.py":
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)} (decode the stored job once, in Job.from_row)")
    assert found == [], "\n".join(found)


def test_halving_has_no_sentinel_and_its_states_are_named_only_in_records() -> None:
    names = set(ROUND_STATES) | {HALVING_KIND}
    found = []
    for rel, tree in _modules(outside="queue/records.py"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "HELD":
                found.append(f"{rel}:{node.lineno}: HELD")
            if isinstance(node, ast.Constant) and isinstance(node.value, float) and node.value >= 1e15:
                found.append(f"{rel}:{node.lineno}: a sentinel time {node.value}")
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                    found += [f"{rel}:{node.lineno}: {ast.unparse(node)}" for v in values
                              if isinstance(v, ast.Constant) and v.value in names]
    assert found == [], "\n".join(found)


def test_the_guards_see_what_they_guard() -> None:
    """The checks above would find a read by key, a sentinel and a state compared by its literal."""
    tree = ast.parse("job.spec['spec']\nclaim.job.spec.get('base_model')\nif state == 'pruned': pass\n")
    subscripts = [n for n in ast.walk(tree) if isinstance(n, ast.Subscript) and _is_spec(n.value)]
    gets = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and _is_spec(n.func.value)]
    compared = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and any(isinstance(c, ast.Constant) and c.value in ROUND_STATES for c in n.comparators)]
    assert len(subscripts) == len(gets) == len(compared) == 1
