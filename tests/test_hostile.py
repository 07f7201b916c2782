"""Hostile input, as an attacker or a careless operator would give it (issue 16), class by class.

Each class of the issue has a test that would have caught its example and one
with a variant of it. Real parts throughout: the command line in-process (its
``main``, which maps errors to exit codes), real SQLite files, real symlinks and
FIFOs swapped in between submit and run, a real trainer process on the tiny model.
The slow parts (a trainer) are shared: one ``loraq run`` meets every swap.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

import adapters as ad
from conftest import LORAQ, TINY_DEFAULTS, write_queue
from loraq.cli import main
from loraq.queue import migrations
from loraq.queue.store import Store

SECRET = "AWS_SECRET_ACCESS_KEY=AKIAverysecret"


def cli(*args: str, home: Path | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    """``loraq ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main([*(["--home", str(home)] if home else []), *args])
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0)
    finally:
        os.chdir(previous)
    return code, out.getvalue(), err.getvalue()


def one_line_errors(err: str) -> list[str]:
    """stderr as lines; each must be one clear line: no traceback, no control characters, short."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    for line in lines:
        assert line.isprintable(), repr(line)
        assert len(line) < 2000, line[:200]
    return lines


def job_queue(workdir: Path, jobs: str, name: str = "queue.yaml") -> Path:
    return write_queue(workdir, TINY_DEFAULTS + "jobs:\n" + jobs, name)


# ---------------------------------------------------------------- reads outside the roots: swaps after submit


@pytest.mark.slow
def test_datasets_swapped_after_submit_are_refused_unread_by_the_trainer(workdir: Path, tmp_path_factory) -> None:
    """Checked at submit, then swapped: a symlink to a secret, to /dev/zero, a FIFO, other bytes of the same size.

    The trainer opens each on a descriptor it checks; none is read, none blocks, and no
    error quotes the secret file's content.
    """
    outside = tmp_path_factory.mktemp("outside")
    secret = outside / "credentials.jsonl"
    secret.write_text(f'{{"{SECRET}": 1, "db_password=hunter2": 2}}\n')
    rows = (workdir / "data" / "sql.jsonl").read_text()
    names = ["to-secret", "to-zero", "to-fifo", "same-size"]
    for name in names:
        (workdir / "data" / f"{name}.jsonl").write_text(rows)
    queue = job_queue(workdir, "".join(f"  - {{name: {n}, dataset: ./data/{n}.jsonl, max_retries: 0}}\n" for n in names))
    home = workdir / ".loraq"
    code, _, err = cli("submit", str(queue), home=home)
    assert code == 0, err
    data = workdir / "data"
    (data / "to-secret.jsonl").unlink()
    (data / "to-secret.jsonl").symlink_to(secret)
    (data / "to-zero.jsonl").unlink()
    (data / "to-zero.jsonl").symlink_to("/dev/zero")
    (data / "to-fifo.jsonl").unlink()
    os.mkfifo(data / "to-fifo.jsonl")
    swapped = bytearray(rows.encode())
    swapped[10] = ord("Z") if swapped[10] != ord("Z") else ord("Y")
    (data / "same-size.jsonl").write_bytes(bytes(swapped))

    run = subprocess.run([LORAQ, "--home", str(home), "run", "--devices", "cpu", "--stall-timeout", "120"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    with Store.open(home.joinpath("loraq.db"), readonly=True) as store:
        failed = {job.name: job for job in store.jobs()}
    for name in names:
        job = failed[name]
        assert (job.status, job.error_kind, job.attempts) == ("failed", "data", 1), (name, job.error)
        assert SECRET not in (job.error or "") and "hunter2" not in (job.error or "")
    assert "outside the allowed roots" in failed["to-secret"].error
    assert "outside the allowed roots" in failed["to-zero"].error
    assert "a FIFO" in failed["to-fifo"].error
    assert "changed since it was submitted" in failed["same-size"].error
    code, out, err = cli("status", home=home)
    assert code == 0 and SECRET not in out + err


def test_a_base_model_file_that_leads_out_of_the_roots_is_refused(workdir: Path, tmp_path_factory) -> None:
    """tokenizer.json (the example) and, as a variant, the weights: a symlink out of every root is not read."""
    outside = tmp_path_factory.mktemp("elsewhere")
    model = workdir / "models" / "tiny"
    for file in ("tokenizer.json", "model.safetensors"):
        shutil.move(model / file, outside / file)
        (model / file).symlink_to(outside / file)
        queue = job_queue(workdir, "  - {name: a, dataset: ./data/sql.jsonl}\n")
        code, _, err = cli("submit", str(queue), "--dry-run", home=workdir / ".loraq")
        lines = one_line_errors(err)
        assert code == 1
        assert any("base_model" in line and file in line and "outside the allowed roots" in line for line in lines), lines
        (model / file).unlink()
        shutil.move(outside / file, model / file)
    # A FIFO under a model file's name would block the load: refused too.
    os.mkfifo(model / "special_tokens_map.json.fifo")
    os.rename(model / "special_tokens_map.json.fifo", model / "generation_config.json")
    code, _, err = cli("submit", str(queue), "--dry-run", home=workdir / ".loraq")
    assert code == 1 and "not a regular file" in err


def test_a_bare_base_model_name_is_never_looked_up_in_the_working_folder(workdir: Path, tmp_path: Path) -> None:
    """``base_model: tiny`` names a hub id; a ./tiny in the working folder (outside every root) is not read."""
    cwd = tmp_path / "elsewhere"
    shutil.copytree(workdir / "models" / "tiny", cwd / "tiny")
    queue = job_queue(workdir, "  - {name: a, dataset: ./data/sql.jsonl, base_model: tiny}\n")
    code, _, err = cli("submit", str(queue), "--dry-run", home=workdir / ".loraq", cwd=cwd)
    (line,) = one_line_errors(err)
    assert code == 1 and "not in the local Hugging Face cache" in line
    # Variant: org/name, as a folder pair in the working folder.
    shutil.copytree(workdir / "models" / "tiny", cwd / "org" / "tiny")
    queue = job_queue(workdir, "  - {name: a, dataset: ./data/sql.jsonl, base_model: org/tiny}\n")
    code, _, err = cli("submit", str(queue), "--dry-run", home=workdir / ".loraq", cwd=cwd)
    assert code == 1 and "not in the local Hugging Face cache" in err


def test_a_path_outside_the_roots_says_how_to_allow_it_for_good(workdir: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("shared-data")
    shutil.copy(workdir / "data" / "sql.jsonl", outside / "sql.jsonl")
    queue = job_queue(workdir, f"  - {{name: a, dataset: {outside / 'sql.jsonl'}}}\n")
    home = workdir / ".loraq"
    code, _, err = cli("submit", str(queue), "--dry-run", home=home)
    assert code == 1
    assert "--allow-root DIR" in err and f"allow_roots: [DIR] in {home / 'config.yaml'}" in err
    home.mkdir()
    (home / "config.yaml").write_text(f"allow_roots: [{outside}]\n")
    code, _, err = cli("submit", str(queue), "--dry-run", home=home)
    assert code == 0, err


# ---------------------------------------------------------------- command-line paths are the operator's (issue 10)


def test_inspect_of_an_absolute_path_from_another_folder_passes(tmp_path: Path, tmp_path_factory) -> None:
    folder = ad.synthetic(tmp_path_factory.mktemp("somewhere") / "adapter")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    code, out, err = cli("inspect", str(folder), home=tmp_path / "home", cwd=cwd)
    assert code == 0, out + err
    # A symlink inside the named folder that leads out of it is still refused.
    (cwd / "secret.txt").write_text(SECRET)
    (folder / "notes.txt").symlink_to(cwd / "secret.txt")
    code, out, err = cli("inspect", str(folder), "--json", home=tmp_path / "home", cwd=cwd)
    assert code == 1
    assert "symlink_escape" in {f["code"] for f in json.loads(out)["findings"]}
    assert SECRET not in out + err


def test_the_working_folder_is_no_root(tmp_path: Path) -> None:
    """Relative to the working folder only what is named is read: a dataset next to it is not a root."""
    cwd = tmp_path / "cwd"
    folder = ad.synthetic(cwd / "adapter")
    inside_cwd = cwd / "notes"
    inside_cwd.mkdir()
    (inside_cwd / "x.txt").write_text("x")
    (folder / "README.md").symlink_to(inside_cwd / "x.txt")  # in the working folder, but out of the adapter's
    code, out, _ = cli("inspect", "adapter", "--json", home=tmp_path / "home", cwd=cwd)
    assert code == 1 and "symlink_escape" in {f["code"] for f in json.loads(out)["findings"]}


# ---------------------------------------------------------------- code and pickles


@pytest.mark.parametrize("where", ["job", "defaults"])
def test_trust_remote_code_needs_the_operator(workdir: Path, where: str) -> None:
    body = (TINY_DEFAULTS.replace("defaults:\n", "defaults:\n  trust_remote_code: true\n") if where == "defaults"
            else TINY_DEFAULTS) + "jobs:\n  - {name: a, dataset: ./data/sql.jsonl" + (
        ", trust_remote_code: true}\n" if where == "job" else "}\n")
    queue = write_queue(workdir, body)
    home = workdir / ".loraq"
    for dry in (["--dry-run"], []):
        code, _, err = cli("submit", str(queue), *dry, home=home)
        (line,) = one_line_errors(err)
        assert code == 1 and "trust_remote_code" in line and "--allow-remote-code" in line
    assert not (home / "loraq.db").exists()
    code, _, err = cli("submit", str(queue), "--dry-run", "--allow-remote-code", home=home)
    assert code == 0, err
    home.mkdir()
    (home / "config.yaml").write_text("allow_remote_code: true\n")
    code, _, err = cli("submit", str(queue), "--dry-run", home=home)
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("swap", ["pickle", "other-weights"])
def test_inspect_base_loads_the_bytes_it_checked(workdir: Path, tmp_path: Path, monkeypatch, swap: str) -> None:
    """Between the checks and PEFT's load the folder changes; the load uses a private copy of what was checked.

    The example: an ``adapter_model.bin`` pickle swapped in for the safetensors (its
    payload would write a marker); the variant: other safetensors whose lora_B is zero.
    """
    import pickle

    from loraq.inspect import inspect_adapter, on_base
    from loraq.sandbox import Roots

    base = workdir / "models" / "tiny"
    folder = ad.peft_adapter(base, tmp_path / "adapter", targets=["q_proj", "v_proj"])
    marker = tmp_path / "pwned"
    real_layout = on_base.base_layout

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    def swap_then_layout(base_path: str):  # type: ignore[no-untyped-def]
        weights = folder / "adapter_model.safetensors"
        if swap == "pickle":
            weights.unlink()
            (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
        else:
            ad.set_values(weights, next(n for n in ad.lora_names(weights, "lora_B")), lambda a: a.fill(0))
            for name in ad.lora_names(weights, "lora_B"):
                ad.set_values(weights, name, lambda a: a.fill(0))
        return real_layout(base_path)

    monkeypatch.setattr(on_base, "base_layout", swap_then_layout)
    result = inspect_adapter(folder, roots=Roots.of([folder, base]), base=str(base))
    assert result.passed, result.to_json()["findings"]
    assert result.stats["max_logit_change"] > 0  # the checked adapter, not the swapped one, was loaded
    assert not marker.exists()


# ---------------------------------------------------------------- results that lie: names, duplicate keys


@pytest.mark.parametrize(("name", "why"), [
    ("evil\n", "must be 1-100 characters"),
    ("evil\r", "must be 1-100 characters"),
    ("1", "only digits"),
    ("007", "only digits"),
    ("CON", "device name"),
    ("nul.txt", "device name"),
    ("Com1", "device name"),
    ("trailing.", "end with a dot"),
    ("-rf", "must be 1-100 characters"),
    ("--help", "must be 1-100 characters"),
])
def test_names_that_are_not_one_folder_everywhere_are_refused(workdir: Path, name: str, why: str) -> None:
    queue = job_queue(workdir, f"  - name: {json.dumps(name)}\n    dataset: ./data/sql.jsonl\n")
    code, _, err = cli("submit", str(queue), "--dry-run", home=workdir / ".loraq")
    (line,) = one_line_errors(err)
    assert code == 1 and ": name: " in line and why in line


def test_names_that_differ_only_in_case_are_one_name(workdir: Path) -> None:
    queue = job_queue(workdir, "  - {name: Bot, dataset: ./data/sql.jsonl}\n  - {name: bot, dataset: ./data/sql.jsonl}\n")
    code, _, err = cli("submit", str(queue), "--dry-run", home=workdir / ".loraq")
    (line,) = one_line_errors(err)
    assert code == 1 and "duplicate name" in line and "differ only in case" in line
    # Variant: against a job already in the home.
    home = workdir / ".loraq"
    assert cli("submit", str(job_queue(workdir, "  - {name: Bot, dataset: ./data/sql.jsonl}\n", "a.yaml")), home=home)[0] == 0
    later = job_queue(workdir, "  - {name: BOT, dataset: ./data/sql.jsonl}\n", "b.yaml")
    for dry in (["--dry-run"], []):
        code, _, err = cli("submit", str(later), *dry, home=home)
        assert code == 1 and "differ only in case" in err
    # '#1' is always the job with id 1.
    code, out, _ = cli("show", "#1", home=home)
    assert code == 0 and out.startswith("Bot (id 1)")


@pytest.mark.parametrize("body", [
    "jobs:\n  - {name: a, dataset: ./data/sql.jsonl}\njobs:\n  - {name: b, dataset: ./data/sql.jsonl}\n",
    "jobs:\n  - name: a\n    dataset: ./data/sql.jsonl\n    lora: {r: 4}\n    lora: {r: 64}\n",
])
def test_duplicate_yaml_keys_are_errors(workdir: Path, body: str) -> None:
    queue = write_queue(workdir, TINY_DEFAULTS + body)
    code, _, err = cli("submit", str(queue), "--dry-run", home=workdir / ".loraq")
    (line,) = one_line_errors(err)
    assert code == 1 and "duplicate key" in line and line.startswith(f"{queue}:")


# ---------------------------------------------------------------- results that lie: a foreign adapter


def _scripted_worker_run(home_path: Path, names: list[str]):  # type: ignore[no-untyped-def]
    from loraq.supervisor.worker import Worker, WorkerConfig
    from loraq.workspace import Home
    from test_worker import ScriptedExecutor, trains

    home = Home(home_path)
    home.ensure()
    store = Store.open(home.db_path)
    executor = ScriptedExecutor(trains())
    Worker(home, store, executor, config=WorkerConfig(heartbeat_s=0.02, poll_s=0.005), clock=executor.clock).run()
    return home, store, executor


@pytest.mark.parametrize("variant", ["another home", "another spec"])
def test_an_adapter_folder_this_job_did_not_make_is_set_aside_not_adopted(tmp_path: Path, variant: str) -> None:
    """Ids restart at 1 in every home: a folder copied from elsewhere must not complete a job that never trained."""
    from loraq.queue.store import NewJob
    from test_faults import resolved_spec

    for home in ("a", "b"):
        with Store.open(tmp_path / home / "loraq.db") as store:
            spec = resolved_spec("bot")
            if home == "b" and variant == "another spec":
                spec["spec"]["lora"]["r"] = 16
            store.enqueue([NewJob(name="bot", spec=spec, base_key="tiny", dataset_sha256="0" * 64)],
                          settings={"retry_backoff_s": 0})
    _, a_store, _ = _scripted_worker_run(tmp_path / "a", ["bot"])
    assert a_store.job("bot").status == "completed"
    if variant == "another home":
        shutil.copytree(tmp_path / "a" / "adapters" / "bot", tmp_path / "b" / "adapters" / "bot")
    else:  # the same home id, but the manifest records another spec: an operator's copy of another job
        target = tmp_path / "b" / "adapters" / "bot"
        shutil.copytree(tmp_path / "a" / "adapters" / "bot", target)
        manifest = json.loads((target / "loraq-manifest.json").read_text())
        with Store.open(tmp_path / "b" / "loraq.db") as b:
            manifest["home_id"] = b.home_id()
        (target / "loraq-manifest.json").write_text(json.dumps(manifest))
    _, b_store, executor = _scripted_worker_run(tmp_path / "b", ["bot"])
    job = b_store.job("bot")
    assert job.status == "completed" and not (job.result or {}).get("recovered")
    assert len(executor.requests) == 1  # it trained
    (moved,) = (tmp_path / "b" / "set-aside").iterdir()
    assert moved.name.startswith("bot.") and (moved / "loraq-manifest.json").is_file()
    assert any("did not make" in (e.reason or "") for e in b_store.events(job.id))
    mine = json.loads((tmp_path / "b" / "adapters" / "bot" / "loraq-manifest.json").read_text())
    assert mine["home_id"] == b_store.home_id() != a_store.home_id()


def _old_home(db: Path) -> None:
    """A database as the loraq before home ids made it (every migration before the home id's)."""
    before = next(i for i, script in enumerate(migrations.MIGRATIONS) if "home_id" in script)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for number, script in enumerate(migrations.MIGRATIONS[:before], start=1):
        for statement in migrations.statements(script):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    conn.close()


def test_a_home_made_before_home_ids_gets_one_on_upgrade(tmp_path: Path) -> None:
    db = tmp_path / "loraq.db"
    _old_home(db)
    with Store.open(db, readonly=True) as store:  # the first open upgrades an intact older home, once
        first = store.home_id()
    with Store.open(db) as store:
        assert first and len(first) == 32 and store.home_id() == first  # written once, never again
    with Store.open(tmp_path / "other.db") as other:
        assert other.home_id() != first  # every home its own


def test_an_older_home_on_a_read_only_disk_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _old_home(home / "loraq.db")
    before = (home / "loraq.db").read_bytes()
    result = _read_only(home, LORAQ, "--home", str(home), "status")
    (line,) = one_line_errors(result.stderr)
    assert result.returncode == 1 and "older loraq" in line and "writable" in line
    assert (home / "loraq.db").read_bytes() == before


# ---------------------------------------------------------------- denial of service


ALIAS_BOMB = """
defaults:
  base_model: ./models/tiny
  lora:
    target_modules: &a [q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj, q_proj]
    r: 4
  training: &b {a: [*a, *a, *a, *a, *a, *a, *a, *a, *a]}
x1: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
x2: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
x3: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
x4: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
x5: [*f, *f, *f, *f, *f, *f, *f, *f, *f]
jobs: [{name: a, dataset: ./data/sql.jsonl}]
"""


@pytest.mark.parametrize(("body", "words"), [
    (ALIAS_BOMB, "alias bomb"),
    ("defaults: {lora: &l {r: 4, nested: [*l]}}\njobs: [{name: a, dataset: ./data/sql.jsonl}]\n", "refers to the node"),
    ("jobs:\n  - name: a\n    dataset: ./data/sql.jsonl\n    lora: " + "[" * 500 + "]" * 500 + "\n", "nested"),
    ("jobs:\n  - name: a\n    dataset: ./data/sql.jsonl\n    lora: " + "{a: " * 40 + "1" + "}" * 40 + "\n", "nested"),
])
def test_queue_files_that_expand_or_nest_without_bound_get_one_short_line(workdir: Path, body: str, words: str) -> None:
    queue = write_queue(workdir, body)
    code, _, err = cli("submit", str(queue), "--dry-run", home=workdir / ".loraq")
    (line,) = one_line_errors(err)
    assert code == 1 and words in line and len(line) < 300


def test_a_huge_value_is_quoted_as_a_short_excerpt(workdir: Path) -> None:
    queue = job_queue(workdir, "  - {name: a, dataset: ./data/sql.jsonl, lora: {target_modules: " + "x" * 100_000 + "}}\n")
    code, _, err = cli("submit", str(queue), "--dry-run", home=workdir / ".loraq")
    (line,) = one_line_errors(err)
    assert code == 1 and len(line) < 400 and "lora.target_modules" in line


@pytest.mark.parametrize(("limit", "make", "words"), [
    ("max_row_bytes: 2000", lambda d: d.write_text('{"prompt": "q", "completion": "' + "x" * 5000 + '"}\n'
                                                   + '{"prompt": "q", "completion": "a"}\n' * 20),
     "the row's size in bytes (5,"),
    ("max_rows: 50", lambda d: d.write_text('{"prompt": "q", "completion": "a"}\n' * 51), "the number of rows"),
    ("max_file_bytes: 1000", lambda d: d.write_text('{"prompt": "q", "completion": "a"}\n' * 60),
     "the file's size in bytes"),
])
def test_dataset_limits_name_themselves_and_how_to_raise_them(workdir: Path, limit: str, make, words: str) -> None:
    make(workdir / "data" / "big.jsonl")
    home = workdir / ".loraq"
    home.mkdir()
    (home / "config.yaml").write_text(f"limits: {{{limit}}}\n")
    queue = job_queue(workdir, "  - {name: a, dataset: ./data/big.jsonl}\n")
    code, _, err = cli("submit", str(queue), "--dry-run", home=home)
    lines = one_line_errors(err)
    assert code == 1
    assert any("[too_large]" in line and words in line and "config.yaml" in line for line in lines), lines


def test_the_default_row_limit_refuses_a_ten_megabyte_row(tmp_path: Path) -> None:
    from loraq.data import check_dataset

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "' + "y" * (10 << 20) + '"}\n{"text": "fine"}\n')
    dataset, problems = check_dataset(path)
    assert dataset is not None and len(dataset) == 1
    (problem,) = problems.problems()
    assert "[too_large]" in problem.message and "max_row_bytes" in problem.message


def test_a_parquet_file_of_many_rows_is_refused_from_its_footer(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from loraq.data import ReadLimits, check_dataset

    path = tmp_path / "many.parquet"
    table = pa.table({"text": pa.array(["same"] * 200_000).dictionary_encode()})
    pq.write_table(table, path, row_group_size=1000)
    assert path.stat().st_size < 400_000
    _, problems = check_dataset(path, limits=ReadLimits(max_rows=100_000))
    assert any("max_rows" in p.message and "200,000" in p.message for p in problems.problems())
    _, problems = check_dataset(path, limits=ReadLimits(max_parquet_row_groups=100))
    assert any("max_parquet_row_groups" in p.message for p in problems.problems())


def test_regexes_in_an_adapter_config_run_bounded(tmp_path: Path, monkeypatch) -> None:
    """``.{0,1000}`` repeated, then X (the example) and the same in exclude_modules (the variant) end, with a finding."""
    from loraq.inspect import inspect_adapter, lora_config

    for field, hostile in (("target_modules", ".{0,1000}.{0,1000}.{0,1000}X"),
                           ("exclude_modules", ".{0,1000}.{0,1000}.{0,1000}q_proj")):
        folder = ad.synthetic(tmp_path / field)
        ad.edit_config(folder, **{field: hostile})
        result = inspect_adapter(folder)  # it ends; what the regex selects is judged as usual
        assert "wrong_targets" in {f.code for f in result.findings}, result.to_json()["findings"]
    folder = ad.synthetic(tmp_path / "five", cfg=ad.config(targets=".{0,1000}" * 5 + "X"))
    assert "unbounded repetitions" in json.dumps(inspect_adapter(folder).to_json())
    # Past the time budget, matching stops with a finding instead of running on.
    monkeypatch.setattr(lora_config, "REGEX_BUDGET_S", 0.0)
    folder = ad.synthetic(tmp_path / "slow", cfg=ad.config(targets=r".*\.(q_proj|v_proj)"))
    result = inspect_adapter(folder)
    assert any(f.code == "bad_config" and "takes longer than" in f.message for f in result.findings)


def test_the_regex_peft_runs_is_timed_before_peft_runs_it(tmp_path: Path) -> None:
    from loraq.inspect.lora_config import LoraSettings
    from loraq.inspect.on_base import peft_regex_problem

    slow = LoraSettings(r=8, alpha=16, dropout=0.0, targets=".{0,99}.{0,99}.{0,99}.{0,99}Z")
    assert "takes longer than" in peft_regex_problem(slow, ["a" * 400] * 50, budget=0.3)
    fine = LoraSettings(r=8, alpha=16, dropout=0.0, targets=r".*\.q_proj", exclude=r"lm_head")
    assert peft_regex_problem(fine, ["model.layers.0.self_attn.q_proj"] * 50) is None


# ---------------------------------------------------------------- terminal and report injection


ESC_NAME = "data\x1b]0;owned\x07\x1b[31m\nFAKE: PASS"


def test_control_characters_never_reach_the_terminal(workdir: Path, tmp_path: Path) -> None:
    """Names and messages through status, show, inspect, logs and errors on stderr are escaped."""
    home = workdir / ".loraq"
    odd = workdir / "data" / f"{ESC_NAME}.jsonl"
    shutil.copy(workdir / "data" / "sql.jsonl", odd)
    queue = job_queue(workdir, f"  - name: odd\n    dataset: {json.dumps(str(odd))}\n")
    code, out, err = cli("submit", str(queue), home=home)
    assert code == 0, err
    with Store.open(home / "loraq.db") as store:
        from loraq.queue.store import WorkerId

        claim = store.claim(WorkerId("h", 1, "t"), lease_s=60)
        store.fail(claim.job.id, claim.epoch, kind="data", reason=f"bad row in {odd}", retryable=False)
    attempt = home / "jobs" / "1" / "attempt-1"
    attempt.mkdir(parents=True)
    (attempt / "train.log").write_text(f"step 1 loss=2.0\nquoted row: {ESC_NAME}\n")
    for args in (["status"], ["show", "odd"], ["logs", "odd"], ["report", "--format", "md"]):
        code, out, err = cli(*args, home=home)
        assert code == 0, (args, err)
        assert "\x1b" not in out + err and "\x07" not in out + err, args
        if args[0] != "logs":  # a log's lines are its content; a name never spans two
            assert not any(line.startswith("FAKE: PASS") for line in out.splitlines()), (args, out)
    folder = ad.synthetic(tmp_path / f"adapter{ESC_NAME}")
    (folder / "x\x1b[2J\nFAKE: PASS.bin").write_bytes(b"\x80")
    code, out, err = cli("inspect", str(folder), home=home)
    assert code == 1 and "\x1b" not in out + err
    assert not any(line.startswith("FAKE: PASS") for line in out.splitlines())
    code, _, err = cli("submit", str(write_queue(workdir, "jobs: [", f"q{ESC_NAME}.yaml")), home=home)
    assert code == 1 and "\x1b" not in err and one_line_errors(err)


def test_the_markdown_report_is_text_not_html(workdir: Path) -> None:
    home = workdir / ".loraq"
    queue = job_queue(workdir, "  - {name: a, dataset: ./data/sql.jsonl}\n  - {name: b, dataset: ./data/sql.jsonl}\n")
    assert cli("submit", str(queue), home=home)[0] == 0
    with Store.open(home / "loraq.db") as store:
        from loraq.queue.store import WorkerId

        claim = store.claim(WorkerId("h", 1, "t"), lease_s=60)
        store.fail(claim.job.id, claim.epoch, kind="data", retryable=False,
                   reason="<script>alert(1)</script><img src=x onerror=alert(2)>\n| broken | row |")
    code, out, _ = cli("report", "--format", "md", home=home)
    assert code == 0
    assert "<script>" not in out and "<img" not in out and "&lt;script&gt;" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 2 and all(line.count(" | ") == table[0].count(" | ") for line in table[2:])
    code, html_out, _ = cli("report", "--format", "html", "-o", str(workdir / "r.html"), home=home)
    assert code == 0 and "<script>alert" not in (workdir / "r.html").read_text()


# ---------------------------------------------------------------- the store and the home


@pytest.mark.parametrize("damage", ["empty", "short"])
def test_an_empty_or_short_database_is_damage_left_as_it_is(workdir: Path, damage: str) -> None:
    home = workdir / ".loraq"
    assert cli("submit", str(job_queue(workdir, "  - {name: a, dataset: ./data/sql.jsonl}\n")), home=home)[0] == 0
    db = home / "loraq.db"
    db.write_bytes(b"" if damage == "empty" else db.read_bytes()[:60])
    before = db.read_bytes()
    for args in (["status"], ["show", "a"], ["report"], ["run", "--devices", "cpu"],
                 ["submit", str(job_queue(workdir, "  - {name: b, dataset: ./data/sql.jsonl}\n", "b.yaml"))]):
        code, out, err = cli(*args, home=home)
        (line,) = one_line_errors(err)
        assert code == 1 and "damaged" in line, (args, line)
        assert db.read_bytes() == before
    assert not (home / "loraq.db-wal").exists() or (home / "loraq.db-wal").stat().st_size == 0


@pytest.mark.parametrize("link", ["loraq.db", "loraq.db-wal"])
def test_a_symlinked_database_is_refused_and_its_target_untouched(tmp_path: Path, link: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    if link != "loraq.db":
        Store.open(home / "loraq.db").close()
    (home / link).symlink_to(target)
    for args in (["status"], ["pause"]):
        code, _, err = cli(*args, home=home)
        (line,) = one_line_errors(err)
        assert code == 1 and "symlink" in line
    assert target.read_bytes() == b""


def _read_only(folder: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``command`` with ``folder`` mounted read-only (a private mount namespace: works as root too)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare for a read-only mount")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not allowed here")
    script = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec \"$@\"")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command],
                          capture_output=True, text=True, timeout=300)


def test_a_read_only_home_still_reads(workdir: Path) -> None:
    home = workdir / ".loraq"
    assert cli("submit", str(job_queue(workdir, "  - {name: a, dataset: ./data/sql.jsonl}\n")), home=home)[0] == 0
    before = {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()}
    for args, words in ((["status"], "pending"), (["show", "a"], "a (id 1): pending"), (["report"], "# loraq"),
                        (["status", "--json"], '"jobs"')):
        result = _read_only(home, LORAQ, "--home", str(home), *args)
        assert result.returncode == 0, (args, result.stderr)
        assert words in result.stdout and "Traceback" not in result.stderr
    result = _read_only(home, LORAQ, "--home", str(home), "pause")
    assert result.returncode == 1 and len(one_line_errors(result.stderr)) == 1
    assert {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(("setup", "args", "words"), [
    ("file", ["status"], "is a file, not a folder"),
    ("file", ["submit", "QUEUE"], "is a file, not a folder"),
    ("unwritable", ["submit", "QUEUE"], "cannot create the home"),
    ("unwritable", ["pause"], "cannot create the home"),
])
def test_a_home_that_cannot_be_one_is_one_line(workdir: Path, tmp_path: Path, setup: str, args: list[str],
                                               words: str) -> None:
    home = tmp_path / "home-file" if setup == "file" else Path("/proc/loraq-home")
    if setup == "file":
        home.write_text("not a folder")
    queue = job_queue(workdir, "  - {name: a, dataset: ./data/sql.jsonl}\n")
    code, _, err = cli(*[str(queue) if a == "QUEUE" else a for a in args], home=home)
    (line,) = one_line_errors(err)
    assert code in (1, 2) and words in line


@pytest.mark.parametrize(("job", "words"), [
    ("{name: a, dataset: ./data/sql.jsonl, priority: 99999999999999999999}", "priority"),
    ('{name: a, dataset: "./data/nul\\0byte.jsonl"}', "NUL byte"),
    ("{name: a, dataset: ./data/" + "x" * 300 + ".jsonl}", "File name too long"),
    ("{name: a, dataset: ./data/loop.jsonl}", "symlink loop"),
    ("{name: a, dataset: ./data/surrogate.jsonl}", "lone surrogate"),
])
def test_odd_values_get_one_line_and_dry_run_refuses_them_too(workdir: Path, job: str, words: str) -> None:
    data = workdir / "data"
    (data / "loop.jsonl").symlink_to(data / "loop2.jsonl")
    (data / "loop2.jsonl").symlink_to(data / "loop.jsonl")
    (data / "surrogate.jsonl").write_text(
        '{"prompt": "q", "completion": "\\ud800 lone"}\n' + '{"prompt": "q", "completion": "a"}\n' * 20)
    queue = job_queue(workdir, f"  - {job}\n")
    home = workdir / ".loraq"
    results = [cli("submit", str(queue), *dry, home=home) for dry in (["--dry-run"], [])]
    for code, _, err in results:
        lines = one_line_errors(err)
        assert code == 1 and any(words in line for line in lines), lines
    assert results[0][2] == results[1][2]  # the dry run refuses exactly what the submit refuses
    assert not home.exists()


def test_a_refused_submit_writes_nothing_into_the_home(workdir: Path) -> None:
    home = workdir / ".loraq"
    queue = job_queue(workdir, "  - {name: good, dataset: ./data/sql.jsonl}\n  - {name: bad, dataset: ./data/nope.jsonl}\n")
    assert cli("submit", str(queue), home=home)[0] == 1
    assert not home.exists()
    # Variant: a home that exists, refused for a name it already holds: no token cache appears.
    assert cli("submit", str(job_queue(workdir, "  - {name: good, dataset: ./data/support.jsonl}\n", "a.yaml")),
               home=home)[0] == 0
    before = sorted(p.relative_to(home) for p in home.rglob("*") if "loraq.db" not in p.name)
    again = job_queue(workdir, "  - {name: good, dataset: ./data/stories.jsonl}\n", "b.yaml")
    assert cli("submit", str(again), home=home)[0] == 1
    assert sorted(p.relative_to(home) for p in home.rglob("*") if "loraq.db" not in p.name) == before


def test_status_never_writes_the_database(workdir: Path) -> None:
    home = workdir / ".loraq"
    assert cli("submit", str(job_queue(workdir, "  - {name: a, dataset: ./data/sql.jsonl}\n")), home=home)[0] == 0
    db = home / "loraq.db"
    stamp = db.stat().st_mtime_ns, db.read_bytes()
    time.sleep(0.01)
    for args in (["status"], ["status", "--json"], ["show", "a"], ["report", "-o", str(workdir / "r.md")]):
        assert cli(*args, home=home)[0] == 0
    assert (db.stat().st_mtime_ns, db.read_bytes()) == stamp
