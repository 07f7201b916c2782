"""The command-line contract: exit codes, JSON shapes, one-line errors on stderr."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import LORAQ, TINY_DEFAULTS, write_queue


def loraq(*args: str, home: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["--home", str(home)] if home else []
    return subprocess.run([LORAQ, *prefix, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_status_on_a_new_home_is_empty_and_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "h"
    result = loraq("status", "--json", home=home)
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"jobs": [], "version": 1}
    assert not home.exists()


def test_home_from_the_environment(tmp_path: Path, workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - {name: a, dataset: ./data/sql.jsonl}\n")
    env_home = tmp_path / "env-home"
    result = subprocess.run([LORAQ, "submit", str(queue)], capture_output=True, text=True,
                            env={**__import__("os").environ, "LORAQ_HOME": str(env_home)})
    assert result.returncode == 0, result.stderr
    assert (env_home / "loraq.db").is_file()


def test_submit_lists_every_error_and_enqueues_nothing(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + """
jobs:
  - {name: fine, dataset: ./data/sql.jsonl}
  - {name: neg, dataset: ./data/sql.jsonl, lora: {r: -4}}
  - {name: typo, dataset: ./data/sql.jsonl, trainng: {epochs: 1}}
  - {name: gone, dataset: ./data/nothing.jsonl}
""")
    home = workdir / ".loraq"
    result = loraq("submit", str(queue), home=home)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert any(f"{queue}: job 'neg': lora.r" in line for line in lines)
    assert any("job 'typo': trainng: unknown key" in line for line in lines)
    assert any("job 'gone': dataset.path: file not found" in line for line in lines)
    assert json.loads(loraq("status", "--json", home=home).stdout) == {"jobs": [], "version": 1}


def test_a_bad_dataset_row_is_named_and_enqueues_nothing(workdir: Path) -> None:
    with open(workdir / "data" / "sql.jsonl", "a") as fh:
        fh.write('{"prompt": "x"\n')
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - {name: a, dataset: ./data/sql.jsonl}\n  - {name: b, dataset: ./data/stories.jsonl}\n")
    home = workdir / ".loraq"
    result = loraq("submit", str(queue), home=home)
    assert result.returncode == 1
    assert "sql.jsonl:121" in result.stderr and "not_json" in result.stderr
    assert json.loads(loraq("status", "--json", home=home).stdout) == {"jobs": [], "version": 1}


def test_dry_run_enqueues_nothing_and_creates_no_home(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - {name: a, dataset: ./data/support.jsonl}\n")
    home = workdir / ".loraq"
    result = loraq("submit", str(queue), "--dry-run", home=home)
    assert result.returncode == 0, result.stderr
    assert "a:" in result.stdout and "nothing enqueued" in result.stdout
    assert not (home / "loraq.db").exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert loraq("frobnicate").returncode == 2
    assert loraq("status", "--no-such-flag").returncode == 2
    assert loraq("submit").returncode == 2
    result = loraq("report", "--format", "pdf", home=tmp_path)
    assert result.returncode == 2 and "--format" in result.stderr
    assert loraq("run", "--devices", "gpu-please", home=tmp_path).returncode == 2


def test_unknown_job_exits_1_with_one_line(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - {name: a, dataset: ./data/sql.jsonl}\n")
    home = workdir / ".loraq"
    assert loraq("submit", str(queue), home=home).returncode == 0
    for command in (["show", "nope"], ["logs", "nope"], ["cancel", "nope"], ["retry", "nope"]):
        result = loraq(*command, home=home)
        assert result.returncode == 1, command
        assert len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr


def test_cancel_and_retry_follow_the_lifecycle(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - {name: a, dataset: ./data/sql.jsonl}\n  - {name: b, dataset: ./data/sql.jsonl}\n")
    home = workdir / ".loraq"
    loraq("submit", str(queue), home=home)
    assert loraq("retry", "a", home=home).returncode == 1  # pending: nothing to retry
    result = loraq("cancel", "a", home=home)
    assert result.returncode == 0 and "a: cancelled" in result.stdout
    assert loraq("cancel", "a", home=home).returncode == 1  # already cancelled
    jobs = {j["name"]: j["status"] for j in json.loads(loraq("status", "--json", home=home).stdout)["jobs"]}
    assert jobs == {"a": "cancelled", "b": "pending"}
    assert loraq("retry", "a", home=home).returncode == 0
    shown = json.loads(loraq("show", "a", "--json", home=home).stdout)
    assert [(e["from_state"], e["to_state"]) for e in shown["events"]] == [
        (None, "pending"), ("pending", "cancelled"), ("cancelled", "pending")]


def test_pause_shows_in_status(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - {name: a, dataset: ./data/sql.jsonl}\n")
    home = workdir / ".loraq"
    loraq("submit", str(queue), home=home)
    assert loraq("pause", "--reason", "maintenance", home=home).returncode == 0
    status = json.loads(loraq("status", "--json", home=home).stdout)
    assert status["queue"] == {"paused": True, "reason": "maintenance"}
    assert "queue paused: maintenance" in loraq("status", home=home).stdout
    loraq("resume", home=home)
    assert "queue" not in json.loads(loraq("status", "--json", home=home).stdout)


def test_a_damaged_database_is_reported_not_replaced(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "loraq.db").write_bytes(b"garbage" * 500)
    for command in (["status"], ["run"], ["show", "x"]):
        result = loraq(*command, home=home)
        assert result.returncode == 1, command
        assert "damaged" in result.stderr and "Move it aside" in result.stderr
    assert (home / "loraq.db").read_bytes() == b"garbage" * 500


def test_demo_writes_its_files_and_refuses_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    result = loraq("demo", str(target), "--no-run")
    assert result.returncode == 0, result.stderr
    for rel in ("queue.yaml", "models/tiny/config.json", "models/tiny/model.safetensors",
                "models/tiny/tokenizer.json", "data/support.jsonl", "data/sql.jsonl", "data/stories.jsonl"):
        assert (target / rel).is_file(), rel
    dry = loraq("--home", str(target / ".loraq"), "submit", str(target / "queue.yaml"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    refused = loraq("demo", str(foreign), "--no-run")
    assert refused.returncode == 2 and "not a loraq demo folder" in refused.stderr
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_submit_json_carries_typed_problems(workdir: Path) -> None:
    with open(workdir / "data" / "support.jsonl", "a") as fh:
        fh.write('{"messages": [{"role": "robot", "content": "beep"}]}\n')
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - {name: a, dataset: ./data/support.jsonl}\n")
    result = loraq("submit", str(queue), "--json", home=workdir / ".loraq")
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert out["ok"] is False
    assert [p["category"] for p in out["problems"]] == ["unrecognized_role"]
    assert "support.jsonl:121" in out["problems"][0]["where"]
    assert "unrecognized_role" in result.stderr


def test_inspect_exit_codes(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside-adapter")
    (outside / "adapter_config.json").write_text("{}")
    assert loraq("inspect", str(workdir / "missing"), cwd=workdir).returncode == 2
    # A folder named on the command line is the operator's, wherever it is: inspected (and failed), not refused.
    assert loraq("inspect", str(outside), cwd=workdir).returncode == 1
    empty = workdir / "empty-adapter"
    empty.mkdir()
    result = loraq("inspect", str(empty), "--json", cwd=workdir)
    assert result.returncode == 1
    assert json.loads(result.stdout)["findings"][0]["code"] == "empty_folder"
    assert loraq("inspect", str(empty), "--data", "./data/sql.jsonl", cwd=workdir).returncode == 2


def test_every_json_output_carries_its_version(workdir: Path) -> None:
    """Scripts check "version" (README: what a change of it means); the keys DESIGN.md names stay."""
    import adapters

    home = workdir / ".loraq"
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - {name: a, dataset: ./data/sql.jsonl}\n")
    adapters.synthetic(workdir / "adapter")
    outputs = {
        "submit --dry-run": loraq("submit", str(queue), "--dry-run", "--json", home=home),
        "submit": loraq("submit", str(queue), "--json", home=home),
        "submit, rejected": loraq("submit", str(queue), "--json", home=home),  # the name is taken now
        "status": loraq("status", "--json", home=home),
        "show": loraq("show", "a", "--json", home=home),
        "inspect": loraq("inspect", str(workdir / "adapter"), "--json", home=home, cwd=workdir),
    }
    for command, result in outputs.items():
        out = json.loads(result.stdout)
        assert out["version"] == 1, command
    assert [j["name"] for j in json.loads(outputs["status"].stdout)["jobs"]] == ["a"]
    assert json.loads(outputs["submit, rejected"].stdout)["ok"] is False
