"""Dependencies point one way: the supervisor side never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SUPERVISOR = ["loraq", "loraq.queue.store", "loraq.supervisor.worker", "loraq.executors.base", "loraq.executors.local",
              "loraq.api", "loraq.cli", "loraq.queue.spec", "loraq.report", "loraq.supervisor.publish",
              "loraq.checkpoints", "loraq.fsutil", "loraq.workspace", "loraq.inspect", "loraq.inspect.on_base",
              "loraq.inspect.safetensors", "loraq.inspect.lora_config", "loraq.queue.records", "loraq.queue.migrations",
              "loraq.data", "loraq.data.encoding", "loraq.data.check",
              "loraq.serve", "loraq.serve.app", "loraq.serve.feed", "loraq.serve.render", "loraq.serve.security",
              "loraq.serve.server"]
HEAVY = ["torch", "transformers", "peft"]


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


def test_store_uses_only_the_standard_library() -> None:
    loaded = modules_after("import loraq.queue.store, loraq.queue.records, loraq.queue.migrations")
    third_party = {m.split(".")[0] for m in loaded} & {"yaml", "pydantic", "numpy", "typer", "rich", "psutil"}
    assert not third_party
