"""The trainer's code keeps its shape: per-job state on an object, its modules layered, docstrings that name what exists.

Read with ``ast``, nothing imported: a function of many parameters is state that wants an
object (STYLE.md rule 13; issue 21: ``_attempt`` took 15 and ``_finish`` 20 before
:class:`loraq.train.job.JobRun`), and a module docstring that names a function since
renamed or moved sends its reader to nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from test_imports import import_graph

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loraq"
TRAIN = PACKAGE / "train"

#: The most parameters a function in train/ may take (self and cls not counted; keyword-only ones are).
MAX_PARAMETERS = 8


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> list[str]:
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return [n for n in names if n not in {"self", "cls"}]


def test_no_function_in_train_takes_more_than_eight_parameters() -> None:
    wide = []
    for path in sorted(TRAIN.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if len(names := parameters(node)) > MAX_PARAMETERS:
                    wide.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {getattr(node, 'name', 'lambda')}: "
                                f"{len(names)} parameters")
    assert not wide, "keep the state on an object (train/job.py's JobRun):\n" + "\n".join(wide)


def test_the_parameter_count_sees_every_kind_of_parameter() -> None:
    """The counter itself: keyword-only, *args and **kwargs count, self does not."""
    tree = ast.parse("class A:\n    def f(self, a, /, b, *args, c, d=1, **kw): pass\n")
    method = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    assert parameters(method) == ["a", "b", "c", "d", "args", "kw"]


def defined(path: Path) -> dict[str, set[str]]:
    """The names a module defines at its top level (to each, the names its class body defines, if a class)."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            names[node.name] |= {n.target.id for n in node.body
                                 if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    names[target.id] = set()
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0]: set() for alias in node.names}
    return names


def module_file(dotted: str) -> Path | None:
    parts = dotted.split(".")[1:]  # below loraq
    for candidate in (PACKAGE.joinpath(*parts).with_suffix(".py"), PACKAGE.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def resolves(reference: str, here: str) -> bool:
    """Whether a Sphinx reference (``.job``, ``JobRun._attempt``, ``~loraq.model.base.BaseCache``) names a thing."""
    target = reference.lstrip("~")
    if target.startswith("."):  # a sibling in train/
        target = "loraq.train" + target
    elif not target.startswith("loraq."):
        target = f"{here}.{target}"
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module, then names inside it
        path = module_file(".".join(parts[:cut]))
        if path is None:
            continue
        rest = parts[cut:]
        if not rest:
            return True
        names = defined(path)
        return rest[0] in names and (len(rest) == 1 or (len(rest) == 2 and rest[1] in names[rest[0]]))
    return False


def test_the_module_docstrings_of_train_name_what_exists() -> None:
    """A ``:func:``/``:class:``/``:meth:``/``:mod:`` reference, and a ``_private`` name in double back-quotes."""
    stale = []
    for path in sorted(TRAIN.glob("*.py")):
        here = "loraq.train" + ("" if path.stem == "__init__" else f".{path.stem}")
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        for reference in re.findall(r":(?:func|class|meth|mod|data|attr):`([~\w.]+)`", doc):
            if not resolves(reference, here):
                stale.append(f"{path.name}: {reference}")
        names = {name for chain in defined(path).values() for name in chain} | set(defined(path))
        for private in re.findall(r"``(_\w+)``", doc):
            if private not in names:
                stale.append(f"{path.name}: ``{private}``")
    assert not stale, stale


def test_the_docstring_reader_finds_a_stale_name() -> None:
    assert resolves(".job", "loraq.train.service") and resolves("JobRun._attempt", "loraq.train.job")
    assert resolves("~loraq.model.base.BaseCache", "loraq.train.service") and resolves(".controls.Batching", "x")
    assert not resolves("_injected_bug", "loraq.train.service") and not resolves(".nowhere", "loraq.train.service")
    assert not resolves("JobRun._gone", "loraq.train.job")


#: Inside train/, who may import whom: the process (pipe, service) runs a job (job), which uses the parts;
#: a part never reaches back up to the job or the process (tests/test_imports.py holds the packages).
TRAIN_MAY_IMPORT: dict[str, set[str]] = {
    "__main__": {"pipe"},
    "pipe": {"service"},
    "service": {"job", "preference"},
    "preference": {"job", "controls", "faults", "prepare", "quality", "tracking"},  # a JobRun with the preference loop (issue 23)
    "job": {"controls", "faults", "layout", "prepare", "quality", "tracking"},
    "prepare": {"faults"},  # the injected bug is found in the job's rows
    "quality": {"controls"},  # early stopping's Measure
    "faults": {"controls"},  # the injected out-of-memory error follows the Batching
    "layout": {"memory"},
    "controls": set(),
    "memory": set(),
    "tracking": set(),
    "": set(),  # train/__init__.py
}


def test_the_trainer_modules_import_downwards_only() -> None:
    graph = {m.removeprefix("loraq.train").lstrip("."): {t.removeprefix("loraq.train.") for t in targets
                                                        if t.startswith("loraq.train.")}
             for m, targets in import_graph().items() if m == "loraq.train" or m.startswith("loraq.train.")}
    assert set(graph) == set(TRAIN_MAY_IMPORT), f"add to TRAIN_MAY_IMPORT: {sorted(set(graph) - set(TRAIN_MAY_IMPORT))}"
    wrong = sorted(f"train.{m} imports train.{t}" for m, targets in graph.items() for t in targets - TRAIN_MAY_IMPORT[m])
    assert not wrong, wrong
