"""End to end through the command line: submit, run, status, show, logs, report; real training."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import LORAQ, THREE_JOBS, TINY_DEFAULTS, write_queue

pytestmark = pytest.mark.slow


def loraq(home: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"loraq {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def status(home: Path) -> dict[str, dict]:
    return {j["name"]: j for j in json.loads(loraq(home, "status", "--json").stdout)["jobs"]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_datasets: dict[str, Path]) -> dict:
    """One real queue of three tiny jobs, run once for the tests in this module."""
    import shutil

    work = tmp_path_factory.mktemp("e2e")
    shutil.copytree(tiny_model, work / "models" / "tiny")
    (work / "data").mkdir()
    for path in demo_datasets.values():
        shutil.copy(path, work / "data" / path.name)
    queue = write_queue(work, THREE_JOBS)
    home = work / ".loraq"
    submitted = loraq(home, "submit", str(queue))
    ran = loraq(home, "run", "--devices", "cpu")
    return {"work": work, "home": home, "submit": submitted, "run": ran, "queue": queue}


def test_every_job_completes_once(finished: dict) -> None:
    jobs = status(finished["home"])
    assert set(jobs) == {"chat-bot", "sql-writer", "stories"}
    for job in jobs.values():
        assert job["status"] == "completed", job
        assert job["attempts"] == 1
        assert job["verdict"] == "pass"
        assert job["progress"]["step"] == 6
        assert job["eval_loss"] is not None and job["base_eval_loss"] is not None
    assert "3 completed" in finished["run"].stdout


def test_published_folders_hold_exactly_the_promised_files(finished: dict) -> None:
    adapters = finished["home"] / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["chat-bot", "sql-writer", "stories"]
    for folder in adapters.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors", "inspection.json", "loraq-manifest.json"]
        manifest = json.loads((folder / "loraq-manifest.json").read_text())
        assert manifest["name"] == folder.name
        assert len(manifest["dataset"]["sha256"]) == 64
        assert set(manifest["versions"]) >= {"torch", "transformers", "peft"}
        assert manifest["eval_loss"] is not None and manifest["base_eval_loss"] is not None
        assert manifest["train_loss"] is not None
        assert json.loads((folder / "inspection.json").read_text())["passed"] is True
        assert "PeftModel.from_pretrained" in (folder / "README.md").read_text()


def test_adapters_load_unchanged_with_peft_and_transformers_and_change_the_output(finished: dict) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = finished["work"] / "models" / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    inputs = tokenizer("Question: How many users are in Paris?\nSQL:", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        reference = base(**inputs).logits
    for name in ("chat-bot", "sql-writer", "stories"):
        folder = finished["home"] / "adapters" / name
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
        with torch.no_grad():
            with_peft = peft_model(**inputs).logits
        assert not torch.allclose(with_peft, reference, atol=1e-6), name

        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        plain.load_adapter(str(folder), adapter_name=name)
        with torch.no_grad():
            with_transformers = plain(**inputs).logits
        assert torch.allclose(with_transformers, with_peft, atol=1e-5), name


def test_metrics_and_events_are_recorded(finished: dict) -> None:
    shown = json.loads(loraq(finished["home"], "show", "sql-writer", "--json").stdout)
    names = {m["name"] for m in shown["metrics"]}
    assert {"loss", "eval_loss", "base_eval_loss"} <= names
    transitions = [(e["from_state"], e["to_state"]) for e in shown["events"]]
    assert transitions == [(None, "pending"), ("pending", "running"), ("running", "completed")]
    assert shown["attempts"][0]["outcome"] == "completed"
    assert shown["inspection"]["passed"] is True


def test_logs_show_the_attempts_training(finished: dict) -> None:
    log = loraq(finished["home"], "logs", "stories").stdout
    assert "step 6/6" in log and "checkpoint saved at step 3" in log


def test_reports_in_three_formats(finished: dict, tmp_path: Path) -> None:
    home = finished["home"]
    as_json = json.loads(loraq(home, "report", "--format", "json").stdout)
    assert as_json["counts"]["completed"] == 3
    job = next(j for j in as_json["jobs"] if j["name"] == "chat-bot")
    assert job["curves"]["loss"] and job["curves"]["eval_loss"]
    assert job["base_eval_loss"] is not None and job["adapter_bytes"] > 0
    assert job["dataset_rows"] == 120 and job["n_train"] + job["n_eval"] == 120 and len(job["dataset_sha256"]) == 64
    md = loraq(home, "report", "--format", "md").stdout
    assert "| chat-bot | completed | 1/3 |" in md
    out = tmp_path / "r.html"
    loraq(home, "report", "--format", "html", "-o", str(out))
    html = out.read_text()
    assert "<svg" in html and "sql-writer" in html
    assert (home / "reports" / "report.json").is_file()


def test_checkpoints_are_cleaned_after_completion(finished: dict) -> None:
    assert not list((finished["home"] / "jobs").glob("*/attempt-*/checkpoints"))
    assert not list((finished["home"] / "jobs").glob("*/attempt-*/staging"))


def test_resubmitting_the_same_names_enqueues_nothing(finished: dict) -> None:
    again = loraq(finished["home"], "submit", str(finished["queue"]), check=False)
    assert again.returncode == 1
    assert "already in" in again.stderr
    assert len(status(finished["home"])) == 3


def test_a_permanent_error_fails_at_once_and_the_exit_code_says_so(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + """
jobs:
  - name: bad-targets
    dataset: ./data/sql.jsonl
    lora: {target_modules: [no_such_proj]}
  - name: good
    dataset: ./data/sql.jsonl
""")
    home = workdir / ".loraq"
    loraq(home, "submit", str(queue))
    ran = loraq(home, "run", "--devices", "cpu", check=False)
    assert ran.returncode == 1
    jobs = status(home)
    assert jobs["good"]["status"] == "completed"
    bad = jobs["bad-targets"]
    assert (bad["status"], bad["attempts"], bad["error_kind"]) == ("failed", 1, "spec")
    assert "no_such_proj" in bad["error"]
    assert not (home / "adapters" / "bad-targets").exists()


def test_an_adapter_that_misses_the_quality_gate_is_not_published(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + """
jobs:
  - name: too-ambitious
    dataset: ./data/stories.jsonl
    validation: {split: 0.1, min_eval_loss_drop: 100.0}
""")
    home = workdir / ".loraq"
    loraq(home, "submit", str(queue))
    assert loraq(home, "run", "--devices", "cpu", check=False).returncode == 1
    job = status(home)["too-ambitious"]
    assert (job["status"], job["verdict"], job["error_kind"]) == ("failed", "fail", "inspection")
    assert "quality_gate" in job["error"]
    assert not (home / "adapters" / "too-ambitious").exists()
    shown = json.loads(loraq(home, "show", "too-ambitious", "--json").stdout)
    assert any(f["code"] == "quality_gate" for f in shown["inspection"]["findings"])


def test_a_dataset_changed_after_submit_is_refused_not_trained(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - {name: edited, dataset: ./data/sql.jsonl}\n")
    home = workdir / ".loraq"
    loraq(home, "submit", str(queue))
    with open(workdir / "data" / "sql.jsonl", "a") as fh:
        fh.write('{"prompt": "unchecked", "completion": " row"}\n')
    assert loraq(home, "run", "--devices", "cpu", check=False).returncode == 1
    job = status(home)["edited"]
    assert (job["status"], job["attempts"], job["error_kind"]) == ("failed", 1, "data")
    assert "changed since it was submitted" in job["error"]


def test_inspect_a_published_adapter_against_its_base_and_data(finished: dict) -> None:
    work = finished["work"]
    result = subprocess.run([LORAQ, "--home", str(finished["home"]), "inspect", str(finished["home"] / "adapters" / "sql-writer"),
                             "--base", "./models/tiny", "--data", "./data/sql.jsonl", "--json"],
                            capture_output=True, text=True, timeout=300, cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""  # findings on stdout, no loading bars
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["stats"]["eval_loss"] < report["stats"]["base_eval_loss"]
