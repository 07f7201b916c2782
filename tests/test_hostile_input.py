"""Hostile input, round 3 (issue 20): numbers past their range, unbounded work from small input, wrong verdicts.

Each class has the issue's example and a variant of its own. Real parts throughout: the
command line as a process, real SQLite files, a real trainer process on the tiny model. Hangs are bounded
by a pytest timeout, never by asserting a wall-clock time.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import LORAQ, TINY_DEFAULTS, write_queue
from loraq.data import budget
from loraq.data.templates import CHATML, render_chat
from loraq.errors import TemplateBudgetError
from loraq.queue import spec as queue_spec
from loraq.queue import sweep
from loraq.queue.store import Store
from loraq.workspace import Home


def cli(*args: str, home: Path | None = None) -> tuple[int, str, str]:
    """``loraq ARGS`` as a process: (exit code, stdout, stderr)."""
    out = subprocess.run([LORAQ, *(["--home", str(home)] if home else []), *args], capture_output=True, text=True,
                         timeout=300)
    return out.returncode, out.stdout, out.stderr


def loraq(home: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=timeout)


def lines_of(err: str) -> list[str]:
    """stderr as lines, each one clear line: no traceback, no internal error."""
    assert "Traceback" not in err and "internal error" not in err, err
    return err.strip().splitlines()


def job_queue(workdir: Path, jobs: str, name: str = "queue.yaml") -> Path:
    return write_queue(workdir, TINY_DEFAULTS + "jobs:\n" + jobs, name)


def names(home: Path) -> set[str]:
    if not Home(home).db_path.exists():
        return set()
    with Store.open(Home(home).db_path, create=False) as store:
        return {job.name for job in store.jobs()}


# ---------------------------------------------------------------- numbers past their range


def test_numbers_past_their_range_are_refused_at_submit_naming_the_field(workdir: Path) -> None:
    """The issue's max_steps (which passed submit and then killed every run in the store) and alpha 1e308; then
    every other number the spec holds, past its documented range, and pissa_niter_<n> in other digits."""
    queue = job_queue(workdir, """\
  - name: steps
    dataset: ./data/support.jsonl
    training: {max_steps: 99999999999999999999999}
  - name: alpha
    dataset: ./data/support.jsonl
    lora: {alpha: 1e308}
  - name: saves
    dataset: ./data/support.jsonl
    training: {save_steps: 10000000000000000000, logging_steps: 1.0e+15, eval_steps: 99999999999}
  - name: decay
    dataset: ./data/support.jsonl
    training: {weight_decay: 1.0e+300}
    validation: {split: 0.1, min_eval_loss_drop: -1.0e+300, early_stopping: {min_delta: 1.0e+300}}
  - name: niter
    dataset: ./data/support.jsonl
    lora: {init: "pissa_niter_١٢"}
  - name: niter-big
    dataset: ./data/support.jsonl
    lora: {init: pissa_niter_99999999999999999999}
pause_after_failures: 100000000000000000000
""")
    home = workdir / ".loraq"
    code, _, err = cli("submit", str(queue), home=home)
    assert code == 1
    lines = lines_of(err)
    expected = [
        "job 'steps': training.max_steps: Input should be less than or equal to 10000000",
        "job 'alpha': lora.alpha: Input should be less than or equal to 65536",
        "job 'saves': training.save_steps: Input should be less than or equal to 10000000",
        "job 'saves': training.logging_steps: Input should be less than or equal to 10000000",
        "job 'saves': training.eval_steps: Input should be less than or equal to 10000000",
        "job 'decay': training.weight_decay: Input should be less than or equal to 10",
        "job 'decay': validation.min_eval_loss_drop: Input should be greater than or equal to -1000",
        "job 'decay': validation.early_stopping.min_delta: Input should be less than or equal to 1000",
        "job 'niter': lora.init: pissa_niter_<n> takes n from 1 to 1000",
        "job 'niter-big': lora.init: pissa_niter_<n> takes n from 1 to 1000",
        "pause_after_failures: Input should be less than or equal to 1000000",
    ]
    for want in expected:
        assert any(want in line for line in lines), (want, lines)
    assert not home.exists()  # nothing was enqueued, nothing was made


def test_a_clone_cannot_set_a_number_past_its_range_and_the_queue_keeps_running(workdir: Path) -> None:
    """The issue's other route (clone --set), and its consequence: the job must never reach the store."""
    queue = job_queue(workdir, "  - name: base-job\n    dataset: {path: ./data/sql.jsonl, format: prompt_completion}\n")
    home = workdir / ".loraq"
    assert cli("submit", str(queue), home=home)[0] == 0
    for override, field in [("training.max_steps=99999999999999999999999", "training.max_steps"),
                            ("lora.alpha=1e308", "lora.alpha"), ("priority=-99999999999999999999", "priority"),
                            ("training.seed=18446744073709551616", "training.seed")]:
        code, _, err = cli("clone", "base-job", "copy", "--set", override, home=home)
        assert code == 1, (override, err)
        (line,) = lines_of(err)
        assert f"clone of 'base-job': job 'copy': {field}: Input should be" in line, line
    assert names(home) == {"base-job"}


def test_job_ids_past_sqlite_or_in_other_digits_are_no_job(workdir: Path) -> None:
    """Ids past SQLite's 64 bits were an OverflowError ('internal error'); '#١' (Arabic-Indic 1) was job 1."""
    queue = job_queue(workdir, "  - name: only\n    dataset: ./data/support.jsonl\n")
    home = workdir / ".loraq"
    assert cli("submit", str(queue), home=home)[0] == 0
    refs = ["99999999999999999999", "#99999999999999999999", "9223372036854775808", "١٢", "#١", "١",
            "#" + "9" * 5000]
    for command in ("show", "cancel", "retry", "logs"):
        for ref in refs:
            code, _, err = cli(command, ref, home=home)
            assert code == 1, (command, ref, err)
            (line,) = lines_of(err)
            assert "no job named" in line and line.startswith("loraq"), (command, ref, line)
    code, out, _ = cli("show", "#1", home=home)  # the id itself still works
    assert code == 0 and out.startswith("only (id 1): pending")


def test_a_port_or_a_shard_size_out_of_range_is_a_usage_error_before_any_work(tmp_path: Path) -> None:
    home = tmp_path / ".loraq"
    for args in (["serve", "--port", "99999"], ["serve", "--port", "-1"],
                 ["export", "j1", "--to", "merged", str(tmp_path / "out"), "--shard-size", "abc"],
                 ["export", "j1", "--to", "merged", str(tmp_path / "out"), "--shard-size", "-5GB"],
                 ["export", "j1", "--to", "merged", str(tmp_path / "out"), "--shard-size", "2TB"],
                 ["export", "j1", "--to", "merged", str(tmp_path / "out"), "--shard-size", "99999999999999999999GB"],
                 ["run", "--lease", "nan"], ["run", "--stall-timeout", "1e300"], ["logs", "j1", "--attempt", "0"]):
        code, _, err = cli(*args, home=home)
        assert code == 2, (args, err)
        (line,) = lines_of(err)
        assert line.startswith("loraq: Invalid value for"), (args, line)
    assert not home.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["abc", "-5GB", "2TB", "99999999999999999999GB", "5 G"])
def test_the_library_checks_a_shard_size_as_the_command_line_does(tmp_path: Path, size: str) -> None:
    """``loraq.api.export`` is the library's entry: the same check as ``--shard-size``, before any work."""
    from loraq import api
    from loraq.errors import UsageError

    with pytest.raises(UsageError, match=r"^--shard-size: .*(not a size|outside 100KB-1TB)"):
        api.export(Home(tmp_path / ".loraq"), "j1", to="merged", dest=tmp_path / "out", shard_size=size)
    assert not (tmp_path / ".loraq").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- unbounded work from small input


def aliased_sweeps(count: int) -> str:
    """The issue's file: one sweep of 1,000 combinations, then ``count - 1`` more aliasing its axes (~12 KB)."""
    jobs = ["  - name: s0\n    dataset: ./data/sql.jsonl\n    sweep: &axes\n"
            "      training.learning_rate: [1.0e-4, 2.0e-4, 3.0e-4, 4.0e-4, 5.0e-4, 6.0e-4, 7.0e-4, 8.0e-4, 9.0e-4, 1.0e-3]\n"
            "      lora.r: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n      training.seed: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"]
    jobs += [f"  - name: s{i}\n    dataset: ./data/sql.jsonl\n    sweep: *axes\n" for i in range(1, count)]
    return "".join(jobs)


@pytest.mark.timeout(120)
def test_the_job_cap_holds_per_submit_before_any_sweep_expands(workdir: Path) -> None:
    """200 aliased sweeps of 1,000 (the issue's 12 KB file, 200,000 jobs), and a variant under every per-sweep cap:
    two sweeps of 600 and a plain job. One line, nothing enqueued."""
    home = workdir / ".loraq"
    example = job_queue(workdir, aliased_sweeps(200))
    assert example.stat().st_size < 16_000
    code, _, err = cli("submit", str(example), home=home)
    assert code == 1
    (line,) = lines_of(err)
    assert line == (f"{example}: jobs: the queue file's 200 job(s) (200 of them sweeps) expand into 200,000 jobs; "
                    f"at most {sweep.MAX_SUBMIT_JOBS:,} a submit (split the file, or sweep over fewer values)")
    seeds = ", ".join(map(str, range(100)))
    variant = job_queue(workdir, "".join(f"  - name: {name}\n    dataset: ./data/sql.jsonl\n"
                                         f"    sweep: {{training.seed: [{seeds}], lora.r: [1, 2, 3, 4, 5, 6]}}\n"
                                         for name in ("a", "b")) + "  - name: plain\n    dataset: ./data/sql.jsonl\n",
                        name="variant.yaml")
    code, _, err = cli("submit", str(variant), "--dry-run", home=home)
    assert code == 1
    (line,) = lines_of(err)
    assert "the queue file's 3 job(s) (2 of them sweeps) expand into 1,201 jobs; at most 1,000 a submit" in line
    assert not home.exists()


RUNAWAY = {
    # the examples
    "nested-loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}{{ messages }}",
    "repeat": "{{ 'x' * 3000000000 }}",
    # variants: growth by ~ in a namespace, by a filter, by a width, and loops with no call in them at all
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "replace": "{% set s = 'x' * 2000000 %}{{ s|replace('x', s) }}",
    "width": "{{ '%0999999999d' % 1 }}{{ '{:>999999999}'.format(1) }}",
    "center": "{{ messages[0].content|center(3000000000) }}",
    "power": "{{ 7 ** 999999999 }}",
    "bare-loops": "{% set s = 'x' * 5000 %}{% for a in s %}{% for b in s %}{% for c in s %}{% endfor %}{% endfor %}"
                  "{% endfor %}",
    "output": "{% for i in range(99999) %}{{ messages|tojson }}{{ 'y' * 1000 }}{% endfor %}",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(RUNAWAY))
def test_a_runaway_template_stops_within_its_budget(name: str) -> None:
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(TemplateBudgetError) as caught:
        render_chat(RUNAWAY[name], [conversation], add_generation_prompt=False, special_tokens={})
    message = str(caught.value)
    assert message.startswith("the chat template ") and "budget" in message and "\n" not in message
    # the budget is per rendering: the next one (a real template) renders as before
    assert render_chat(CHATML, [conversation], add_generation_prompt=True, special_tokens={}) == [
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n"]


def test_a_template_within_its_budget_renders_as_before() -> None:
    """Loops, joins, repeats and a long conversation that stay inside the budget are not refused."""
    long = "word " * 200_000  # a 1 MB message: the budget grows with the conversation
    template = ("{% for m in messages %}{{ m.role ~ ': ' ~ m.content }}{% for i in range(3) %}.{% endfor %}"
                "{{ (['-'] * 3)|join }}{{ '=' * 10 }}{% endfor %}")
    out = render_chat(template, [[{"role": "user", "content": long}]], add_generation_prompt=False, special_tokens={})
    assert out == [f"user: {long}...---=========="]
    assert budget.limit() == budget.CHARS  # and nothing of the rendering's budget stays behind


@pytest.mark.timeout(300)
def test_submit_and_its_dry_run_stop_a_runaway_template_and_name_it(workdir: Path) -> None:
    """The issue's two templates (nested range(99999), 'x' * 3000000000) at submit --dry-run, and a variant: the
    same runaway template named by two jobs is rendered once (each try costs the whole time budget)."""
    (workdir / "loops.jinja").write_text(RUNAWAY["nested-loops"])
    (workdir / "big.jinja").write_text(RUNAWAY["repeat"])
    queue = job_queue(workdir, """\
  - name: loops
    dataset: ./data/support.jsonl
    chat_template: ./loops.jinja
  - name: loops-again
    dataset: ./data/support.jsonl
    chat_template: ./loops.jinja
    lora: {r: 2}
  - name: big
    dataset: ./data/support.jsonl
    chat_template: ./big.jinja
""")
    home = workdir / ".loraq"
    out = loraq(home, "submit", str(queue), "--dry-run")
    assert out.returncode == 1, out.stdout
    lines = lines_of(out.stderr)
    assert any("job 'loops': chat_template: [template_budget] chat_template './loops.jinja' ran past its 5 s budget"
               in line for line in lines), lines
    assert any("job 'loops-again': chat_template './loops.jinja': [repeated]" in line for line in lines), lines
    assert any("job 'big': chat_template: [template_budget] chat_template './big.jinja' would build a repetition of "
               "3,000,000,000 characters" in line for line in lines), lines
    assert not home.exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_inspect_data_stops_a_runaway_template_in_the_adapter_folder(workdir: Path) -> None:
    from adapters import synthetic

    folder = synthetic(workdir / "adapter", r=4)
    (folder / "chat_template.jinja").write_text(RUNAWAY["bare-loops"] + "{{ messages[0].content }}")
    out = loraq(workdir / ".loraq", "--allow-root", str(workdir), "inspect", str(folder), "--base",
                str(workdir / "models" / "tiny"), "--data", str(workdir / "data" / "support.jsonl"))
    assert out.returncode == 2, (out.stdout, out.stderr)
    # (a dependency's notice on import may precede it: issue 20, section 1, routes those to the log)
    (line,) = [line for line in lines_of(out.stderr) if line.startswith("loraq")]
    assert line == "loraq: the adapter's chat_template.jinja ran past its 5 s budget rendering one conversation " \
                   "(a loop that does not end?)"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_template_that_runs_away_only_in_the_trainer_fails_the_job_there_naming_it(workdir: Path) -> None:
    """A template that renders at submit and runs away in training (here: the stored text, as a template that
    behaves otherwise under the trainer's tokenizer would) fails the job as a spec error at once, not after the
    stall watchdog; the next job of the queue trains."""
    (workdir / "t.jinja").write_text(CHATML)
    queue = job_queue(workdir, """\
  - name: runaway
    dataset: ./data/support.jsonl
    chat_template: ./t.jinja
    training: {max_seq_len: 512}
    max_retries: 0
  - name: fine
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
""")
    home = workdir / ".loraq"
    assert loraq(home, "submit", str(queue)).returncode == 0
    with sqlite3.connect(Home(home).db_path) as conn:
        stored = json.loads(conn.execute("SELECT spec FROM jobs WHERE name = 'runaway'").fetchone()[0])
        stored["chat_template_text"] = RUNAWAY["nested-loops"]
        conn.execute("UPDATE jobs SET spec = ? WHERE name = 'runaway'", (json.dumps(stored),))
    run = loraq(home, "run", "--devices", "cpu", "--stall-timeout", "500", timeout=580)
    assert run.returncode == 1, run.stdout + run.stderr
    job = json.loads(loraq(home, "show", "runaway", "--json").stdout)["job"]
    assert job["status"] == "failed" and job["error_kind"] == "spec", job
    assert "chat_template './t.jinja' ran past its 5 s budget" in job["error"], job["error"]
    assert json.loads(loraq(home, "show", "fine", "--json").stdout)["job"]["status"] == "completed"


# ---------------------------------------------------------------- wrong verdicts: sweeps and clones


def test_sweep_values_equal_once_validated_are_refused_naming_the_field(workdir: Path) -> None:
    """[4, 4.0, "4"] made three identical jobs; variants: a learning rate written as a string and as a number,
    and two entries of ``_`` that differ only by a default written out."""
    queue = job_queue(workdir, """\
  - name: r
    dataset: ./data/support.jsonl
    sweep: {lora.r: [4, 4.0, "4"]}
  - name: lr
    dataset: ./data/support.jsonl
    sweep: {training.learning_rate: ["1e-3", 0.001, 0.002]}
  - name: together
    dataset: ./data/support.jsonl
    sweep:
      _:
        - {lora.alpha: 16}
        - {lora.alpha: 16.0, lora.dropout: 0.0}
""")
    home = workdir / ".loraq"
    code, _, err = cli("submit", str(queue), home=home)
    assert code == 1
    lines = lines_of(err)
    assert lines == [
        f"{queue}: job 'r': sweep.lora.r: 4 and 4.0 are the same value once validated: two jobs of the sweep would "
        "be one job (list each value once)",
        f"{queue}: job 'r': sweep.lora.r: 4 and '4' are the same value once validated: two jobs of the sweep would "
        "be one job (list each value once)",
        f"{queue}: job 'lr': sweep.training.learning_rate: '1e-3' and 0.001 are the same value once validated: two "
        "jobs of the sweep would be one job (list each value once)",
        f"{queue}: job 'together': sweep.lora.alpha, sweep.lora.dropout: lora.alpha 16 and 16.0, lora.dropout "
        "(unset) and 0.0 are the same settings once validated: two jobs of the sweep would be one job (list each "
        "value once)",
    ], lines
    assert not home.exists()
    # distinct values still sweep
    fine = job_queue(workdir, "  - name: r\n    dataset: ./data/support.jsonl\n    sweep: {lora.r: [4, 8.0, '16']}\n",
                     name="fine.yaml")
    code, out, err = cli("submit", str(fine), "--dry-run", home=home)
    assert code == 0, err
    assert "sweep r: 3 job(s)" in out


def test_a_clone_cannot_join_a_sweep_or_start_one(workdir: Path) -> None:
    """clone --set group=X joined any sweep's ranking; variants: --set sweep and --set sweep_strategy."""
    queue = job_queue(workdir, """\
  - name: lr
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    sweep: {training.learning_rate: [1.0e-3, 5.0e-3]}
  - name: other
    dataset: ./data/support.jsonl
""")
    home = workdir / ".loraq"
    assert cli("submit", str(queue), home=home)[0] == 0
    before = names(home)
    for override in ("group=lr", "group=anything", "sweep={training.seed: [1, 2]}", "sweep_strategy=halving",
                     "sweep.training.seed=[1, 2]"):
        code, _, err = cli("clone", "other", "copy", "--set", override, home=home)
        assert code == 1, (override, err)
        (line,) = lines_of(err)
        key = override.split("=")[0]
        assert line == (f"clone of 'other': --set {key}: a clone is one job of its own, in no sweep: it cannot join "
                        "a sweep's group or start one (submit a queue file with the sweep instead)"), line
    assert names(home) == before
    # a clone of one of the sweep's jobs is a job of its own too: in no group, outside the ranking
    child = sweep.child_name("lr", {"training.learning_rate": 1.0e-3})
    assert cli("clone", child, "copy", home=home)[0] == 0
    with Store.open(Home(home).db_path, create=False) as store:
        copy = next(job for job in store.jobs() if job.name == "copy")
    assert copy.spec.settings.group is None


def test_the_documented_ranges_are_the_spec_models_own() -> None:
    """README's table of ranges names each bound the models enforce: the spec is the one place they live."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Every number and its range")[1].split("\n## ")[0]
    for model, prefix in ((queue_spec.LoraSpec, "lora."), (queue_spec.TrainingSpec, "training."),
                          (queue_spec.ValidationSpec, "validation."),
                          (queue_spec.EarlyStoppingSpec, "validation.early_stopping."),
                          (queue_spec.JobSpec, ""), (queue_spec.QueueSettings, "")):
        for field, info in model.model_fields.items():
            if re.search(r"\b(int|float)\b", str(info.annotation)):
                assert f"`{prefix}{field}`" in section, f"{prefix}{field} has no documented range"
