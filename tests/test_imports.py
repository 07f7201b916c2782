"""Dependencies point one way: which package may import which, no cycles, and no torch on the supervisor side.

The table below is the architecture (DESIGN.md, STYLE.md rule 10). The test reads
every module with ``ast``, imports inside functions included, so an import that
hides from the interpreter until it runs (a lazy one) is still an edge here. It
fails on any edge between packages that the table does not allow, and on any
cycle between modules. Changing the table is a design decision: say why in the
commit.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loraq"

#: Who may import whom. A key is a sub-package or a top-level module of loraq
#: (``loraq`` itself: its ``__init__``, the public surface).
MAY_IMPORT: dict[str, set[str]] = {
    # the foundation: standard library only, or nearly
    "errors": set(),
    "escape": set(),  # what loraq prints, made safe: everything that prints or quotes may use it
    "notices": set(),  # what libraries print goes to the home's log while a command runs (the cli routes it)
    "safeyaml": {"errors", "escape"},  # YAML with bounds: the queue file and the home's config.yaml
    "protocol": {"errors"},  # the supervisor <-> trainer seam
    "fsutil": {"errors"},
    # sandbox: where files may be read, on checked descriptors; every reader of a file goes through it
    "sandbox": {"errors", "escape"},
    "workspace": {"errors", "escape", "safeyaml", "sandbox"},
    "queue": {"errors", "escape", "safeyaml", "sandbox"},  # spec, store: knows nothing of training
    "checkpoints": {"errors", "fsutil", "workspace", "inspect"},  # inspect: only its torch-free safetensors reader
    "data": {"errors", "escape", "fsutil", "queue", "sandbox"},  # sandbox: datasets and chat_template files read inside the roots
    # the torch side
    "model": {"errors", "data", "sandbox"},
    "inspect": {"errors", "escape", "sandbox", "workspace", "data", "model"},  # model: only inspect.on_base, against a base
    "train": {"errors", "protocol", "fsutil", "checkpoints", "data", "model", "queue", "sandbox"},
    # the supervisor side (torch-free)
    "executors": {"errors", "protocol", "fsutil", "checkpoints", "workspace", "train",  # train: inside a Ray actor
                  "sandbox"},
    "supervisor": {"errors", "protocol", "fsutil", "checkpoints", "workspace", "queue", "executors", "inspect",
                   "sandbox"},
    # the library's surface and what is built on it
    "report": {"errors", "escape", "fsutil", "workspace", "queue", "supervisor"},
    # views: what the read-only commands (status, the dashboard's queue page, show, logs) return
    "views": {"errors", "workspace", "queue", "supervisor"},
    "demo": {"errors", "fsutil", "model"},  # model: quiet_libraries, when it builds the tiny model
    # export: a GGUF LoRA (torch-free) or a merged model (torch, when it runs) from an inspected adapter;
    # sandbox: the base, its config, the chat template and the target, each checked where it leads
    "export": {"errors", "escape", "fsutil", "inspect", "data", "sandbox"},
    # submit's steps beyond the schema (warm starts, auto values, sweeps' identity, clones): torch-free
    "submitting": {"errors", "fsutil", "inspect", "queue", "sandbox", "workspace"},
    # sandbox: a path named on the command line and refused becomes the command's error (path_errors_as)
    "api": {"errors", "workspace", "queue", "data", "executors", "supervisor", "inspect", "report", "demo", "export",
            "submitting", "views", "sandbox"},
    "loraq": {"api", "errors", "workspace"},
    # service: the OpenAI-style /v1 API over the api (jobs through api.submit_document), its keys and files;
    # data: an upload is checked by the reader submit uses; checkpoints: a job's checkpoint folders.
    # Its generation thread imports torch/transformers/peft themselves, never loraq's torch side.
    "service": {"api", "errors", "escape", "fsutil", "queue", "workspace", "data", "checkpoints"},
    # the runnable layers: they parse and print (or serve) what the api returns
    "serve": {"api", "errors", "escape", "queue", "report", "workspace", "service"},  # escape: pages show text as the CLI prints it
    "cli": {"api", "errors", "escape", "notices", "protocol", "workspace", "serve", "service"},
}

SUPERVISOR = ["loraq", "loraq.queue.store", "loraq.supervisor.worker", "loraq.executors.base", "loraq.executors.local",
              "loraq.api", "loraq.cli", "loraq.queue.spec", "loraq.report", "loraq.supervisor.publish",
              "loraq.supervisor.events",
              "loraq.checkpoints", "loraq.fsutil", "loraq.workspace", "loraq.inspect", "loraq.inspect.on_base",
              "loraq.inspect.safetensors", "loraq.inspect.lora_config", "loraq.queue.records", "loraq.queue.migrations",
              "loraq.data", "loraq.data.encoding", "loraq.data.check", "loraq.protocol", "loraq.errors",
              "loraq.serve", "loraq.serve.app", "loraq.serve.feed", "loraq.serve.render", "loraq.serve.security",
              "loraq.serve.server", "loraq.inspect.serving", "loraq.export", "loraq.export.gguf", "loraq.export.merged",
              "loraq.export.sources", "loraq.export.target",
              "loraq.submitting", "loraq.queue.sweep", "loraq.queue.auto", "loraq.queue.controls",
              "loraq.inspect.warm_start", "loraq.escape", "loraq.safeyaml", "loraq.sandbox",
              "loraq.data.packing", "loraq.data.tokenizer", "loraq.data.templates", "loraq.queue.dbfile",
              "loraq.queue.listing", "loraq.queue.rounds", "loraq.queue.failures", "loraq.views", "loraq.notices", "loraq.inspect.verdict", "loraq.model.graders",
              "loraq.model.judge", "loraq.service", "loraq.service.app",
              "loraq.service.state", "loraq.service.jobs", "loraq.service.files", "loraq.service.generate",
              "loraq.service.completions"]
#: torch's stack, and the graders' and trackers' libraries (imported where a grader or a tracker runs, in the trainer)
HEAVY = ["torch", "transformers", "peft", "mlflow", "wandb", "tensorboard", "sacrebleu", "rouge_score", "rapidfuzz"]


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", SUPERVISOR)
def test_supervisor_modules_do_not_import_torch(module: str) -> None:
    loaded = modules_after(f"import {module}")
    assert not loaded & set(HEAVY), f"{module} pulled in {sorted(loaded & set(HEAVY))}"


def test_status_command_does_not_import_torch(tmp_path) -> None:
    loaded = modules_after(
        "import sys\nfrom loraq.cli import app\n"
        f"app(args=['--home', {str(tmp_path / 'h')!r}, 'status', '--json'], standalone_mode=False)"
    )
    assert not loaded & set(HEAVY)


@pytest.fixture(scope="module")
def queue_on_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A queue of 8 jobs (chat, prompt/completion, alpaca) on the demo's tiny model, as a user writes one."""
    import random

    from loraq import demo

    root = tmp_path_factory.mktemp("submit")
    demo.build_model(root / "models" / "tiny", pretrain_steps=1)
    rng = random.Random(1)
    jobs = []
    for i in range(8):
        name, make = list(demo.DATASETS.values())[i % 3]
        demo.write_jsonl(root / "data" / f"{i}-{name}", make(60, rng))
        jobs.append(f"  - name: job-{i}\n    dataset: ./data/{i}-{name}\n")
    (root / "queue.yaml").write_text("defaults:\n  base_model: ./models/tiny\n  training: {max_steps: 4}\njobs:\n"
                                     + "".join(jobs), encoding="utf-8")
    return root


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
def test_submit_and_its_dry_run_do_not_import_torch(queue_on_disk: Path, dry_run: bool, tmp_path: Path) -> None:
    """Every row tokenised with the base's own tokenizer (tokenizer.json through the tokenizers library) and
    enqueued, without torch, transformers or peft."""
    home = tmp_path / "home"
    args = ["--home", str(home), "submit", str(queue_on_disk / "queue.yaml"), "--json"] + (["--dry-run"] if dry_run
                                                                                          else [])
    loaded = modules_after(f"from loraq.cli import app\napp(args={args!r}, standalone_mode=False)")
    assert not loaded & set(HEAVY), f"submit pulled in {sorted(loaded & set(HEAVY))}"
    assert "tokenizers" in loaded and "jinja2" in loaded  # it did tokenise and render the chat rows
    assert (home / "loraq.db").exists() is not dry_run


def test_store_uses_only_the_standard_library() -> None:
    loaded = modules_after("import loraq.queue.store, loraq.queue.records, loraq.queue.migrations, "
                           "loraq.queue.dbfile, loraq.queue.listing")
    third_party = {m.split(".")[0] for m in loaded} & {"yaml", "pydantic", "numpy", "typer", "rich", "psutil"}
    assert not third_party


# ---------------------------------------------------------------- the direction of imports


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    folder = PACKAGE.parent.joinpath(*name.split("."))
    return folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The loraq modules ``path`` imports, wherever the import statement is (a function body too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # "from x import y" imports the module x.y where there is one, else names from x
            names = [f"{source}.{alias.name}" for alias in node.names]
            modules = [n for n in names if is_module(n)]
            found.update(modules)
            if len(modules) < len(names):
                found.add(source)
    return {n for n in found if n == "loraq" or n.startswith("loraq.")}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) - {module_name(path)} for path in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    """The row of MAY_IMPORT a module belongs to: ``loraq.queue.store`` -> ``queue``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "loraq"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_table_names_every_package_and_draws_no_cycle() -> None:
    units = {unit(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units == set(MAY_IMPORT), f"add to MAY_IMPORT: {sorted(units - set(MAY_IMPORT))}; " \
                                     f"remove: {sorted(set(MAY_IMPORT) - units)}"
    assert not cycles(MAY_IMPORT), cycles(MAY_IMPORT)


def test_every_import_between_packages_is_one_the_table_allows() -> None:
    wrong = sorted(f"{module} imports {target}" for module, targets in import_graph().items() for target in targets
                   if unit(target) != unit(module) and unit(target) not in MAY_IMPORT[unit(module)])
    assert not wrong, "imports the table (MAY_IMPORT) does not allow:\n" + "\n".join(wrong)


def test_no_module_imports_itself_through_others() -> None:
    assert not cycles(import_graph()), "import cycles (imports inside functions included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles(import_graph()))


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    """The reader itself: an import it missed would let a cycle hide (as two once hid in function bodies)."""
    graph = import_graph()
    assert "loraq.inspect" in graph["loraq.supervisor.worker"]  # "from .. import inspect as inspector", in _finish
    assert "loraq.train.service" in graph["loraq.executors.ray_actor"]  # "from ..train import service", in __init__
    assert "loraq.queue.store" in graph["loraq.api"] and "loraq.errors" in graph["loraq.queue.store"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
