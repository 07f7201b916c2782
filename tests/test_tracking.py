"""Graders, the judge and the experiment trackers end to end, on the tiny demo base, through the command line.

The trackers are the real libraries writing to local stores: MLflow's file store
(``MLFLOW_TRACKING_URI``, opted in with ``MLFLOW_ALLOW_FILE_STORE``), TensorBoard event
files (read back with TensorBoard's own reader) and W&B in offline mode (``WANDB_MODE``,
``WANDB_DIR`` in the test's folder); trackio is not installed: a warning, never a failed
job. The judge is a real HTTP server on 127.0.0.1 answering the chat-completions shape.
A kill -9 of the trainer mid-job must leave the resumed attempt in the same runs.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from crashutil import ENV, STARTUP_S, Worker, attempts, make_workdir, wait_for
from test_crash import at_step

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    """A chat-completions endpoint that scores 7 for every answer (a real server in a thread)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps({"object": "chat.completion",
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": "7"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def tracker_env(root: Path) -> dict[str, str]:
    return {**ENV, "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
            "WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb"), "WANDB_SILENT": "true",
            "WANDB_DISABLE_GIT": "true", "WANDB__SERVICE_WAIT": "120"}


def loraq(home: Path, env: dict[str, str], *args: str) -> Any:
    import subprocess

    from conftest import LORAQ

    return subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=900, env=env)


def mlflow_runs(root: Path) -> list[Any]:
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("loraq")
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id]))


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_datasets: dict[str, Path],
        judge_url: str) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tracking")
    work = make_workdir(root / "project", tiny_model, demo_datasets)
    queue = work / "queue.yaml"
    queue.write_text(f"""\
defaults:
  base_model: ./models/tiny
  lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}}
  training: {{max_steps: 6, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 3, logging_steps: 1,
              seed: 3}}
retry_backoff_s: 0
tracking: {{report_to: [mlflow, tensorboard, wandb, trackio]}}
jobs:
  - name: graded
    dataset: {{path: ./data/sql.jsonl, format: prompt_completion}}
    validation:
      split: 0.1
      metrics: [exact_match, rouge_1, rouge_2, rouge_l, bleu, chrf, fuzzy_match, json_valid, json_match, contains, regex]
      contains: SELECT
      regex: '^(SELECT|DELETE)\\b'
      min: {{rouge_l: 0.0}}
      judge: {{endpoint: "{judge_url}", model: stub, rubric: "Is it the right SQL?", timeout_s: 10}}
      early_stopping: {{metric: rouge_l, patience: 5}}
  - name: gated
    dataset: {{path: ./data/sql.jsonl, format: prompt_completion}}
    validation: {{split: 0.1, metrics: [rouge_l], min: {{rouge_l: 1.01}}}}
    tracking: {{report_to: []}}
    max_retries: 0
""".replace("1.01", "1.0"))
    env = tracker_env(root)
    home = work / ".loraq"
    submitted = loraq(home, env, "submit", str(queue))
    assert submitted.returncode == 0, submitted.stderr
    run = loraq(home, env, "run", "--devices", "cpu")
    shown = {name: json.loads(loraq(home, env, "show", name, "--json").stdout) for name in ("graded", "gated")}
    return {"root": root, "home": home, "run": run, "show": shown, "env": env}


GRADERS = ["exact_match", "rouge_1", "rouge_2", "rouge_l", "bleu", "chrf", "fuzzy_match", "json_valid", "json_match",
           "contains", "regex", "judge"]


def test_every_grader_and_the_judge_are_measured_for_base_and_adapter(ran: dict[str, Any]) -> None:
    job = ran["show"]["graded"]["job"]
    assert job["status"] == "completed", job["error"]
    metrics = job["result"]["metrics"]
    assert set(metrics) == set(GRADERS) | {f"base_{m}" for m in GRADERS}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["judge"] == pytest.approx(0.7) and metrics["base_judge"] == pytest.approx(0.7)
    inspection = ran["show"]["graded"]["inspection"] or json.loads(
        (ran["home"] / "adapters" / "graded" / "inspection.json").read_text())
    assert inspection["quality"]["metrics"]["rouge_l"] == {"base": metrics["base_rouge_l"],
                                                           "adapter": metrics["rouge_l"]}
    assert inspection["quality"]["min"] == {"rouge_l": 0.0}
    stopping = job["result"]["extras"]["stopping"]
    assert "eval_rouge_l" in stopping["published_because"] and "best_rouge_l" in stopping


def test_a_grader_gate_the_adapter_misses_fails_inspection(ran: dict[str, Any]) -> None:
    job = ran["show"]["gated"]["job"]
    assert job["status"] == "failed" and "metric_gate" in job["error"]
    assert "below validation.min.rouge_l 1.000" in job["error"]
    assert not (ran["home"] / "adapters" / "gated").exists()


def test_show_and_the_report_show_the_graders_base_to_adapter(ran: dict[str, Any]) -> None:
    metrics = ran["show"]["graded"]["job"]["result"]["metrics"]
    text = loraq(ran["home"], ran["env"], "show", "graded").stdout
    assert f"rouge_l: base {metrics['base_rouge_l']:.3f} -> adapter {metrics['rouge_l']:.3f}" in text
    md = loraq(ran["home"], ran["env"], "report", "--format", "md").stdout
    assert f"rouge\\_l {metrics['base_rouge_l']:.3f} → {metrics['rouge_l']:.3f}" in md  # Markdown escapes _


def test_the_run_reaches_mlflow_tensorboard_and_wandb_and_a_missing_tracker_only_warns(ran: dict[str, Any]) -> None:
    assert ran["run"].returncode == 1  # 'gated' failed, as it should
    job = ran["show"]["graded"]["job"]
    tracking = job["result"]["extras"]["tracking"]
    assert any("trackio is not installed" in w for w in tracking["warnings"])
    (run,) = [r for r in mlflow_runs(ran["root"]) if r.info.run_name == "graded"]
    assert run.info.run_id == tracking["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["loraq.attempt"] == "1" and run.data.params["lora.r"] == "4"
    assert run.data.metrics["rouge_l"] == pytest.approx(job["result"]["metrics"]["rouge_l"])
    scalars = tensorboard_scalars(ran["home"] / "tensorboard" / "graded")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]
    assert scalars["rouge_l"][-1][1] == pytest.approx(job["result"]["metrics"]["rouge_l"], abs=1e-6)
    offline = list((ran["root"] / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(tracking["wandb"]["run_id"])
    # what the libraries print goes to the job's log, never to loraq's own output
    for stream in (ran["run"].stdout, ran["run"].stderr):
        assert "wandb" not in stream.lower() and "mlflow" not in stream.lower(), stream


def test_a_trainer_killed_mid_job_resumes_the_same_tracker_runs(tmp_path: Path, tiny_model: Path,
                                                                demo_datasets: dict[str, Path]) -> None:
    work = make_workdir(tmp_path / "project", tiny_model, demo_datasets)
    queue = work / "queue.yaml"
    queue.write_text("""\
defaults:
  base_model: ./models/tiny
  lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}
  training: {max_steps: 30, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 4, eval_steps: 30,
             logging_steps: 1, seed: 3}
  validation: {split: 0.1}
retry_backoff_s: 0
tracking: {report_to: [mlflow, tensorboard, wandb]}
jobs:
  - name: resumed
    dataset: ./data/support.jsonl
""")
    env = tracker_env(tmp_path)
    home = work / ".loraq"
    assert loraq(home, env, "submit", str(queue)).returncode == 0
    import crashutil

    added = [key for key in env if key not in crashutil.ENV]
    crashutil.ENV.update(env)  # the worker below starts with these (crashutil.Worker passes ENV)
    try:
        worker = Worker(home, "--lease", "5", log=tmp_path / "w.log")
        wait_for(lambda: at_step(home, "resumed", 10), timeout=STARTUP_S, what="'resumed' to reach step 10")
        runs = json.loads((home / "jobs" / "1" / "tracking.json").read_text())
        (trainer,) = worker.trainers()
        trainer.suspend()
        trainer.kill()  # SIGKILL
        assert worker.wait() == 0, worker.output()
    finally:
        for key in added:
            crashutil.ENV.pop(key, None)
    tries = attempts(home, "resumed")
    assert [a["outcome"] for a in tries] == ["retry", "completed"], tries
    assert tries[1]["resumed_from_step"] >= 8
    assert json.loads((home / "jobs" / "1" / "tracking.json").read_text()) == runs  # the same runs, not new ones
    (run,) = mlflow_runs(tmp_path)
    assert run.info.run_id == runs["mlflow"] and run.info.status == "FINISHED"
    assert run.data.tags["loraq.attempt"] == "2"
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri()).get_metric_history(runs["mlflow"], "loss")
    steps = sorted({m.step for m in history})
    assert steps[0] == 1 and steps[-1] == 30  # the one run holds the loss curve of both attempts
    scalars = tensorboard_scalars(home / "tensorboard" / "resumed")
    assert [s for s, _ in scalars["loss"]] == list(range(1, 31))  # steps after the resumed checkpoint: once
    offline = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(runs["wandb"]) for p in offline)


def test_a_run_is_named_for_the_job_and_tagged_with_its_group_sweep_settings_and_attempt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trackers' own APIs, driven as the trainer drives them (no model needed): the run's identity."""
    from loraq.queue.spec import JobSpec
    from loraq.train import tracking

    for key, value in tracker_env(tmp_path).items():
        if key.startswith(("MLFLOW", "WANDB")):
            monkeypatch.setenv(key, value)
    spec = JobSpec.model_validate({"name": "lr-1a2b", "base_model": "org/m", "dataset": "d.jsonl", "group": "lr",
                                   "tracking": {"report_to": ["mlflow", "wandb"]}})
    lines: list[str] = []
    for attempt in (1, 2):
        runs = tracking.open_runs(spec, job_dir=tmp_path / "jobs" / "1", home=tmp_path, attempt=attempt,
                                  sweep={"training.learning_rate": 0.001}, resume_step=None, log=lines.append)
        runs.log({"loss": 1.0 / attempt}, attempt)
        runs.close(attempt == 2)
        assert runs.warnings == [], runs.warnings
    (run,) = mlflow_runs(tmp_path)
    assert run.info.run_name == "lr-1a2b" and run.info.status == "FINISHED"
    assert run.data.tags["loraq.group"] == "lr" and run.data.tags["loraq.attempt"] == "2"
    assert run.data.tags["loraq.sweep.training.learning_rate"] == "0.001"
    assert any("continued" in line for line in lines)
    offline = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    # one offline run folder per attempt (one, if both began within the same second), all of the one run id
    assert offline and len({p.name.rsplit("-", 1)[1] for p in offline}) == 1
