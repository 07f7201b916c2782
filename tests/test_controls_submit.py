"""Training controls at submit, through the CLI (issue 12): sweeps, ``auto``, clones, warm-start checks.

Nothing here trains: a submit checks every job with the base model's tokenizer and
enqueues all or none; what the trainer does with these settings is in
``test_controls_train.py``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import LORAQ, TINY_DEFAULTS, write_queue
from loraq.queue import auto, sweep
from loraq.queue.store import Store
from loraq.workspace import Home

SWEEP = TINY_DEFAULTS + """
jobs:
  - name: lr
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    sweep:
      training.learning_rate: [1.0e-3, 5.0e-3]
      _:
        - {lora.r: 4, lora.alpha: 8}
        - {lora.r: 8, lora.alpha: 16}
  - name: plain
    dataset: ./data/support.jsonl
"""


def loraq(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=300)


def stored(home: Path) -> dict[str, dict]:
    with Store.open(Home(home).db_path, create=False) as store:
        return {job.name: job.spec.doc for job in store.jobs()}


def test_a_sweep_expands_into_stably_named_jobs_of_one_group_and_a_second_submit_adds_nothing(workdir: Path) -> None:
    queue = write_queue(workdir, SWEEP)
    home = workdir / ".loraq"
    dry = loraq(home, "submit", str(queue), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "sweep lr: 4 job(s)" in dry.stdout and "dry run: 5 job(s) valid" in dry.stdout
    assert not home.exists()

    first = loraq(home, "submit", str(queue))
    assert first.returncode == 0, first.stderr
    jobs = stored(home)
    children = {n: s for n, s in jobs.items() if n != "plain"}
    expected = {sweep.child_name("lr", {"training.learning_rate": lr, "lora.r": r, "lora.alpha": a})
                for lr in (1e-3, 5e-3) for r, a in ((4, 8), (8, 16))}
    assert set(children) == expected
    for spec in children.values():
        assert spec["spec"]["group"] == "lr" and "sweep" not in spec["spec"]
        settings = spec["sweep"]
        assert spec["spec"]["training"]["learning_rate"] == settings["training.learning_rate"]
        assert (spec["spec"]["lora"]["r"], spec["spec"]["lora"]["alpha"]) == (settings["lora.r"], settings["lora.alpha"])
    assert jobs["plain"]["spec"]["group"] is None

    listed = json.loads(loraq(home, "status", "--json").stdout)["jobs"]
    assert {row["name"]: row["group"] for row in listed} == {**{n: "lr" for n in expected}, "plain": None}
    table = loraq(home, "status").stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("sweep lr"))
    assert "4 jobs" in table[header] and all(line.startswith("  lr-") for line in table[header + 1:header + 5])

    # The same sweep again: nothing new; the plain job's name is taken, which is still an error.
    again = write_queue(workdir, SWEEP.split("  - name: plain")[0], name="again.yaml")
    second = loraq(home, "submit", str(again))
    assert second.returncode == 0, second.stderr
    assert "4 job(s) of a sweep already in" in second.stdout and "enqueued 0 job(s)" in second.stdout
    assert set(stored(home)) == set(jobs)
    # One value more: only its jobs are new.
    wider = write_queue(workdir, SWEEP.replace("[1.0e-3, 5.0e-3]", "[1.0e-3, 5.0e-3, 2.0e-2]").split("  - name: plain")[0],
                        name="wider.yaml")
    third = loraq(home, "submit", str(wider))
    assert third.returncode == 0, third.stderr
    assert "enqueued 2 job(s)" in third.stdout and len(stored(home)) == 7


def test_bad_sweeps_and_misplaced_auto_get_one_line_each_and_change_nothing(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + """
jobs:
  - name: typo
    dataset: ./data/support.jsonl
    sweep: {training.learnin_rate: [1.0e-3, 2.0e-3]}
  - name: scalar
    dataset: ./data/support.jsonl
    sweep: {lora.r: 8}
  - name: named
    dataset: ./data/support.jsonl
    sweep: {name: [a, b]}
  - name: autor
    dataset: ./data/support.jsonl
    lora: {r: auto}
  - name: bad-value
    dataset: ./data/support.jsonl
    sweep: {training.learning_rate: [1.0e-3, -1]}
""")
    home = workdir / ".loraq"
    out = loraq(home, "submit", str(queue))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert f"{queue}: job 'typo': sweep.training.learnin_rate: unknown key" in lines[0]
    assert any("job 'scalar': sweep.lora.r: must be a non-empty list of values (got 8)" in line for line in lines)
    assert any("job 'named': sweep.name: name cannot be swept" in line for line in lines)
    assert any("job 'autor': lora.r: 'auto' is accepted only for training.epochs, training.batch_size, "
               "training.learning_rate" in line for line in lines)
    bad = sweep.child_name("bad-value", {"training.learning_rate": -1})
    assert any(f"job '{bad}': training.learning_rate: Input should be greater than 0" in line for line in lines)
    assert len(lines) == 5, lines
    assert not home.exists()


def test_auto_settings_are_resolved_from_the_data_stored_and_shown(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS.replace("max_steps: 6, learning_rate: 5.0e-3, batch_size: 8",
                                                       "epochs: auto, learning_rate: auto, batch_size: auto") + """
jobs:
  - name: auto-job
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
""")
    home = workdir / ".loraq"
    dry = loraq(home, "submit", str(queue), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    n_train = 108  # 120 rows, validation.split 0.1
    epochs, _ = auto.epochs_for(n_train)
    micro, accum, _ = auto.batch_for(n_train, 64, None)
    lr, _ = auto.learning_rate_for(micro * accum)
    assert f"epochs: auto → {epochs} (" in dry.stdout
    assert f"batch_size: auto → {micro} (" in dry.stdout and f"learning_rate: auto → {lr} (" in dry.stdout
    assert loraq(home, "submit", str(queue)).returncode == 0
    spec = stored(home)["auto-job"]
    training = spec["spec"]["training"]
    assert (training["epochs"], training["batch_size"], training["learning_rate"]) == (epochs, micro, lr)
    assert spec["auto"]["training.epochs"]["value"] == epochs
    shown = loraq(home, "show", "auto-job").stdout
    assert f"auto:       epochs: auto → {epochs} (" in shown
    report = loraq(home, "report", "--format", "md").stdout
    assert f"epochs: auto → {epochs}" in report


def test_clone_copies_a_job_with_overrides_validated_like_a_submit(workdir: Path) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS.replace("learning_rate: 5.0e-3", "learning_rate: auto") + """
serving: [vllm]
jobs:
  - name: base-job
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
""")
    home = workdir / ".loraq"
    assert loraq(home, "submit", str(queue)).returncode == 0
    made = loraq(home, "clone", "base-job", "copy", "--set", "training.learning_rate=1e-4", "--set", "lora.r=8")
    assert made.returncode == 0, made.stderr
    jobs = stored(home)
    copy = jobs["copy"]
    assert copy["spec"]["training"]["learning_rate"] == 1e-4 and copy["spec"]["lora"]["r"] == 8
    assert copy["dataset_path"] == jobs["base-job"]["dataset_path"] and "auto" not in (copy.get("auto") or {})
    assert copy["serving"] == jobs["base-job"]["serving"] == ["vllm"]  # the job's serving gate goes with it
    # An auto of the original is resolved again for the copy unless --set gives it a value.
    again = loraq(home, "clone", "base-job", "copy-2", "--set", "lora.alpha=4")
    assert again.returncode == 0, again.stderr
    assert stored(home)["copy-2"]["auto"]["training.learning_rate"]["value"] == jobs["base-job"]["auto"][
        "training.learning_rate"]["value"]

    for args, expected in [
        (("nope", "x"), "loraq: no job named 'nope'"),
        (("base-job", "x", "--set", "training.learnin_rate=1"), "clone of 'base-job': job 'x': training.learnin_rate: "
                                                               "unknown key"),
        (("base-job", "x", "--set", "lora.r=auto"), "clone of 'base-job': job 'x': lora.r: 'auto' is accepted only"),
        (("base-job", "x", "--set", "training.batch_size"), "clone of 'base-job': --set training.batch_size: expected "
                                                            "key=value"),
        (("base-job", "copy"), "clone of 'base-job': job 'copy': name: a job named 'copy' is already in"),
    ]:
        out = loraq(home, "clone", *args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stderr.strip().splitlines()[0].startswith(expected), (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert set(stored(home)) == {"base-job", "copy", "copy-2"}


def test_a_warm_start_from_an_adapter_of_another_rank_or_base_is_refused_at_submit(workdir: Path) -> None:
    from adapters import synthetic

    home = workdir / ".loraq"
    synthetic(workdir / "adapters" / "r8", r=8)
    synthetic(Home(home).adapter_dir("published-r4"), r=4)
    narrow = {"self_attn.q_proj": (32, 32), "self_attn.v_proj": (32, 16)}  # a base of another width
    synthetic(workdir / "adapters" / "foreign", r=4, dims=narrow)
    queue = write_queue(workdir, TINY_DEFAULTS + """
jobs:
  - name: rank
    dataset: ./data/support.jsonl
    init_from: ./adapters/r8
  - name: targets
    dataset: ./data/support.jsonl
    lora: {target_modules: [q_proj, k_proj]}
    init_from: published-r4
  - name: base
    dataset: ./data/support.jsonl
    init_from: ./adapters/foreign
  - name: missing
    dataset: ./data/support.jsonl
    init_from: no-such-adapter
  - name: fine
    dataset: ./data/support.jsonl
    init_from: published-r4
""")
    out = loraq(home, "submit", str(queue))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 4, lines
    assert "job 'rank': init_from: ./adapters/r8: the adapter has rank 8 (r=8); the job's lora.r is 4" in lines[0]
    assert "job 'targets': init_from: published-r4: the adapter's LoRA is on ['q_proj', 'v_proj']" in lines[1]
    assert "job 'base': init_from: ./adapters/foreign: the adapter's 'model.layers.0.self_attn.q_proj' maps 32 -> 32" \
        in lines[2]
    assert "job 'missing': init_from: no published adapter named 'no-such-adapter'" in lines[3]
    assert not Home(home).db_path.exists()
    dry = loraq(home, "submit", str(write_queue(workdir, TINY_DEFAULTS + """
jobs:
  - name: fine
    dataset: ./data/support.jsonl
    init_from: published-r4
""", name="fine.yaml")), "--dry-run")
    assert dry.returncode == 0, dry.stderr
