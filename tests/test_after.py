"""Job dependencies (``after: <job>``, issue 23): a job waits for another and starts from its adapter.

The store's rules on a real SQLite file (claim, failure and cancel propagation,
retry); submit's errors, a two-stage queue end to end, a failed and a cancelled
dependency, ``clone``, and a kill -9 while a dependent job waits, through real
``loraq`` processes on the tiny model.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from conftest import Clock, write_queue
from crashutil import STARTUP_S, Worker, check_published, completions, events, integrity, jobs, loraq, query, wait_for
from loraq.errors import TransitionError
from loraq.queue.store import COMPLETED, FAILED, PENDING, RUNNING, NewJob, Store, WorkerId
from loraq.supervisor import publish

W = WorkerId("host", 1, "w1")


def new(name: str, after: str | None = None) -> NewJob:
    return NewJob(name=name, spec={"spec": {"name": name, "after": after}}, base_key="base", after=after)


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Store:
    with Store.open(tmp_path / "loraq.db", clock=clock) as s:
        yield s


def claim_named(store: Store, name: str):
    claim = store.claim(W, lease_s=30)
    assert claim is not None and claim.job.name == name, claim
    return claim


# ---------------------------------------------------------------- the store's rules


def test_claim_hands_out_a_waiting_job_only_once_its_dependency_has_completed(store: Store) -> None:
    # The waiting job has the higher priority and the older id: only the dependency keeps it back.
    store.enqueue([NewJob("second", {"spec": {}}, "base", priority=5, after="first"), new("first")])
    first = claim_named(store, "first")
    assert store.claim(W, lease_s=30) is None  # 'second' waits; nothing else is ready
    assert store.has_runnable()  # ...and a worker keeps waiting for it
    [row] = [r for r in store.listing() if r["name"] == "second"]
    assert (row["after_name"], row["after_status"]) == ("first", RUNNING)
    store.complete(first.job.id, first.epoch, result={})
    assert claim_named(store, "second").job.status == RUNNING


def test_a_failed_dependency_fails_the_waiting_jobs_down_the_chain_saying_why(store: Store) -> None:
    store.enqueue([new("a"), new("b", after="a"), new("c", after="b"), new("free")])
    a = claim_named(store, "a")
    assert store.fail(a.job.id, a.epoch, kind="data", reason="row 3: no text", retryable=False) == FAILED
    b, c = store.job("b"), store.job("c")
    assert (b.status, b.error_kind, b.attempts) == (FAILED, "dependency", 0)
    assert b.error == "after: a failed; 'loraq retry a' makes this job wait on it again: data: row 3: no text"
    assert (c.status, c.error_kind) == (FAILED, "dependency")
    assert c.error == "after: b failed because a failed; 'loraq retry a' makes this job wait again: data: row 3: no text"
    assert store.events("c")[-1].reason.startswith("dependency: after: b failed because a")
    assert store.job("free").status == PENDING  # a job waiting on nothing is untouched
    free = claim_named(store, "free")
    store.complete(free.job.id, free.epoch, result={})
    assert not store.has_runnable()


def test_a_cancelled_dependency_fails_the_waiting_job(store: Store) -> None:
    store.enqueue([new("a"), new("b", after="a")])
    claim_named(store, "a")
    store.cancel("a")  # while it runs
    b = store.job("b")
    assert (b.status, b.error_kind) == (FAILED, "dependency")
    assert b.error == "after: a cancelled; 'loraq retry a' makes this job wait on it again"
    assert store.claim(W, lease_s=30) is None and not store.has_runnable()


def test_retrying_the_dependency_makes_the_jobs_that_failed_because_of_it_wait_again(store: Store, clock: Clock) -> None:
    store.enqueue([new("a"), new("b", after="a"), new("c", after="b"), new("d", after="a")])
    a = claim_named(store, "a")
    store.fail(a.job.id, a.epoch, kind="data", reason="bad", retryable=False)
    # A waiting job alone cannot be retried while what it waits on has failed: retry names the job to retry.
    with pytest.raises(TransitionError, match=r"it waits on b \(after\), which is failed because a is failed: "
                                              r"'loraq retry a' instead"):
        store.retry("c")
    store.retry("a")
    assert {j.name: (j.status, j.error) for j in store.jobs()} == {
        "a": (PENDING, None), "b": (PENDING, None), "c": (PENDING, None), "d": (PENDING, None)}
    assert store.events("b")[-1].reason == "its dependency a was retried: waiting on it again"
    # Now 'a' completes; 'd' fails on its own. Retrying 'a' is not allowed (completed), and 'd' stays failed.
    a = claim_named(store, "a")
    store.complete(a.job.id, a.epoch, result={})
    claim_named(store, "b")
    d = claim_named(store, "d")
    store.fail(d.job.id, d.epoch, kind="data", reason="its own fault", retryable=False)
    store.cancel("b")
    assert store.job("c").status == FAILED
    store.retry("b")  # 'c' failed because of 'b': it waits again; 'd' is not b's
    assert (store.job("c").status, store.job("d").status) == (PENDING, FAILED)


def test_the_adapter_a_waiting_job_starts_from_is_recorded_only_under_its_lease(store: Store) -> None:
    store.enqueue([new("a"), new("b", after="a")])
    a = claim_named(store, "a")
    store.complete(a.job.id, a.epoch, result={})
    b = claim_named(store, "b")
    assert store.bind_warm_start(b.job.id, b.epoch - 1, path="/x", sha256="0" * 64, after="a") is None
    bound = store.bind_warm_start(b.job.id, b.epoch, path="/home/adapters/a", sha256="1" * 64, after="a")
    assert bound is not None and bound == store.job("b")
    assert (bound.spec.init_from_path, bound.spec.init_from_sha256) == ("/home/adapters/a", "1" * 64)
    assert store.events("b")[-1].reason == "after: a completed; starts from its adapter /home/adapters/a"


def test_a_job_stranded_by_an_older_loraq_does_not_keep_run_waiting_and_is_failed_on_start(store: Store) -> None:
    store.enqueue([new("a"), new("b")])
    a = claim_named(store, "a")
    store.fail(a.job.id, a.epoch, kind="data", reason="bad", retryable=False)
    # An edge recorded behind the store's back: 'b' waits on a job that failed before it was made to wait.
    store.conn.execute("INSERT INTO dependencies (job_id, after_id) VALUES (?, ?)", (store.job("b").id, a.job.id))
    assert store.job("b").status == PENDING
    assert store.claim(W, lease_s=30) is None
    assert not store.has_runnable()  # 'loraq run' returns instead of waiting forever
    assert store.fail_stranded() == [store.job("b").id]
    assert (store.job("b").status, store.job("b").error_kind) == (FAILED, "dependency")


def test_enqueue_refuses_cycles_unknown_and_failed_dependencies_adding_nothing(store: Store) -> None:
    store.enqueue([new("done")])
    done = claim_named(store, "done")
    store.fail(done.job.id, done.epoch, kind="data", reason="bad", retryable=False)
    for batch, message in (
        ([new("x", after="y"), new("y", after="x")], "job 'x': after: a cycle (x -> y -> x)"),
        ([new("x", after="nobody")], "job 'x': after: no job named 'nobody'"),
        ([new("x", after="done")], "job 'x': after: done is failed"),
    ):
        with pytest.raises(TransitionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            store.enqueue(batch)
    assert [j.name for j in store.jobs()] == ["done"]
    assert store.dependencies_of("done") == []


def test_an_older_home_gains_the_dependencies_table_and_keeps_its_jobs(tmp_path: Path) -> None:
    from loraq.queue.migrations import MIGRATIONS, statements

    path = tmp_path / "loraq.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:  # a home made before migration 5
        for number, script in enumerate(MIGRATIONS[:4]):
            for statement in statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        conn.execute("INSERT INTO jobs (name, status, spec, base_key, max_retries, created_at, updated_at) "
                     "VALUES ('old', 'pending', '{}', 'base', 2, 0, 0)")
    with Store.open(path) as s:
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        s.enqueue([new("new", after="old")])
        assert [d.name for d in s.dependencies_of("new")] == ["old"]
        assert claim_named(s, "old")


def test_a_job_without_after_hashes_as_before_after_existed(tmp_path: Path) -> None:
    """A sweep submitted again is recognised by its hash: a new field left unset must not change it."""
    import hashlib

    from loraq import submitting
    from loraq.queue.spec import JobSpec, ResolvedJob

    job = ResolvedJob(spec=JobSpec.model_validate({"name": "a", "base_model": "org/model", "dataset": "d.jsonl"}),
                      queue_file="q.yaml", base_model="org/model", dataset_path="/d.jsonl")
    doc = job.model_dump(mode="json")
    doc.pop("queue_file")
    doc.pop("halving")
    doc["spec"].pop("after")
    assert submitting.submitted_sha256(job) == hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    waiting = job.model_copy(update={"spec": job.spec.model_copy(update={"after": "b"})})
    assert submitting.submitted_sha256(waiting) != submitting.submitted_sha256(job)


def test_the_dashboard_lists_what_a_job_waits_on(tmp_path: Path) -> None:
    pytest.importorskip("starlette", reason="loraq serve needs the serve extra")
    from starlette.testclient import TestClient

    from loraq.serve import Settings, create_app
    from loraq.workspace import Home

    home = Home(tmp_path / "home")
    home.ensure()
    with Store.open(home.db_path) as s:
        s.enqueue([new("sft-1"), new("dpo", after="sft-1")])
    app = create_app(Settings(home=home, token="t" * 20, poll_s=0.05))  # type: ignore[arg-type]
    with TestClient(app, base_url="http://127.0.0.1:8765", follow_redirects=False) as client:
        assert client.get(f"/?token={'t' * 20}").status_code == 303
        page = client.get("/").text
    assert "waiting on sft-1 (pending)" in page


# ---------------------------------------------------------------- through the command line, on the tiny model

DEFAULTS = """\
defaults:
  base_model: ./models/tiny
  lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}
  training: {max_steps: 4, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 2, logging_steps: 1, seed: 3}
  validation: {split: 0.1}
retry_backoff_s: 0
"""


def status_rows(home: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(loraq(home, "status", "--json").stdout)["jobs"]}


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_submit_names_the_job_and_after_for_every_dependency_it_refuses(workdir: Path) -> None:
    home = workdir / ".loraq"
    queue = write_queue(workdir, DEFAULTS + """
jobs:
  - name: ok
    dataset: ./data/support.jsonl
  - name: unknown
    dataset: ./data/support.jsonl
    after: nobody
  - name: self
    dataset: ./data/support.jsonl
    after: self
  - name: loop-a
    dataset: ./data/support.jsonl
    after: loop-b
  - name: loop-b
    dataset: ./data/support.jsonl
    after: loop-a
  - name: rank
    dataset: ./data/support.jsonl
    after: ok
    lora: {r: 8}
  - name: both
    dataset: ./data/support.jsonl
    after: ok
    init_from: ok
""")
    refused = loraq(home, "submit", str(queue), check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    lines = refused.stderr.splitlines()

    def line(prefix: str) -> str:
        found = [x for x in lines if prefix in x]
        assert found, (prefix, refused.stderr)
        return found[0]

    assert "no job named 'nobody' in this queue or in" in line("job 'unknown': after:")
    assert "a job cannot wait on itself" in line("job 'self': after:")
    assert "a cycle (loop-a -> loop-b -> loop-a)" in line("job 'loop-a': after:")
    assert "ok trains a LoRA of rank 4; this job's lora.r is 8" in line("job 'rank': after:")
    assert "init_from names another start" in line("job 'both': after:")
    assert not (home / "loraq.db").exists()  # nothing enqueued, no home made
    refused = loraq(home, "submit", str(write_queue(workdir, DEFAULTS + """
jobs:
  - name: bad-name
    dataset: ./data/support.jsonl
    after: "../ok"
""", name="bad.yaml")), check=False)
    assert refused.returncode == 1
    assert "job 'bad-name': after: must name a job (of this queue, or already in the home) (got '../ok')" in refused.stderr


@pytest.mark.slow
def test_a_two_stage_queue_runs_in_order_and_the_second_starts_from_the_firsts_adapter(workdir: Path) -> None:
    home = workdir / ".loraq"
    # 'tuned' trains with a learning rate of ~0: what it publishes is what its LoRA started from.
    queue = write_queue(workdir, DEFAULTS + """
jobs:
  - name: tuned
    dataset: ./data/support.jsonl
    after: sft-1
    priority: 10
    training: {learning_rate: 1.0e-12, max_steps: 1}
  - name: sft-1
    dataset: ./data/support.jsonl
""")
    dry = loraq(home, "submit", "--dry-run", str(queue)).stdout
    assert "  after: sft-1 (waits until it completes; starts from its adapter)" in dry.split("tuned:")[1], dry
    assert "after:" not in dry.split("sft-1:")[1], dry
    assert not (home / "loraq.db").exists()
    loraq(home, "submit", str(queue))
    rows = status_rows(home)
    assert (rows["tuned"]["after"], rows["tuned"]["waiting_on"]) == ("sft-1", "sft-1")
    assert rows["sft-1"]["after"] is None and rows["sft-1"]["waiting_on"] is None
    assert "waiting on sft-1 (pending)" in loraq(home, "status").stdout
    assert "after:      sft-1 (pending): waiting on it" in loraq(home, "show", "tuned").stdout

    ran = loraq(home, "run", "--devices", "cpu", timeout=900)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert {name: j["status"] for name, j in jobs(home).items()} == {"tuned": COMPLETED, "sft-1": COMPLETED}
    # Claimed only after its dependency completed, although it has the higher priority.
    done = [e["id"] for e in events(home, "sft-1") if e["to_state"] == COMPLETED]
    claimed = [e["id"] for e in events(home, "tuned") if (e["from_state"], e["to_state"]) == (PENDING, RUNNING)]
    assert len(done) == 1 and len(claimed) == 1 and claimed[0] > done[0]
    adapters = home / "adapters"
    first, tuned = tensors(adapters / "sft-1"), tensors(adapters / "tuned")
    assert set(first) == set(tuned)
    for key, value in first.items():
        assert (tuned[key] - value).abs().max().item() < 1e-6, key  # it started from sft-1's weights
    # ...not from a cold start, whose lora_B is all zeros (PEFT's default init), which this learning rate keeps
    lora_b = [key for key in tuned if "lora_B" in key]
    assert lora_b and all(tuned[key].abs().max().item() > 1e-4 for key in lora_b)
    manifest = publish.read_manifest(adapters / "tuned")
    assert manifest["spec"]["after"] == "sft-1"
    assert manifest["init_from"]["path"] == str((adapters / "sft-1").resolve())
    assert manifest["init_from"]["sha256"] == publish.read_manifest(adapters / "sft-1")["files"][
        "adapter_model.safetensors"]["sha256"]
    shown = loraq(home, "show", "tuned").stdout
    assert f"warm start: after sft-1 ({(adapters / 'sft-1').resolve()})" in shown
    assert "after:      sft-1 (completed); starts from its adapter" in shown
    assert status_rows(home)["tuned"]["waiting_on"] is None
    shown_json = json.loads(loraq(home, "show", "tuned", "--json").stdout)
    assert shown_json["job"]["after"] == "sft-1" and shown_json["job"]["waiting_on"] is None
    report = {j["name"]: j for j in json.loads(loraq(home, "report", "--format", "json").stdout)["jobs"]}
    assert report["tuned"]["after"] == "sft-1" and report["sft-1"]["after"] is None
    assert f"warm start: after sft-1 ({(adapters / 'sft-1').resolve()})" in report["tuned"]["controls"]

    # A job of a later queue may wait on one already in the home (completed: checked on its adapter).
    refused = loraq(home, "submit", str(write_queue(workdir, DEFAULTS + """
jobs:
  - name: later
    dataset: ./data/support.jsonl
    after: tuned
    lora: {r: 8}
""", name="later.yaml")), check=False)
    assert refused.returncode == 1 and "job 'later': after: tuned: the adapter has rank 4 (r=4)" in refused.stderr

    # clone keeps after (its dependency has completed: it starts from the adapter), or takes another.
    loraq(home, "clone", "tuned", "tuned-copy")
    loraq(home, "clone", "tuned", "from-tuned", "--set", "after=tuned")
    rows = status_rows(home)
    assert (rows["tuned-copy"]["after"], rows["from-tuned"]["after"]) == ("sft-1", "tuned")
    ran = loraq(home, "run", "--devices", "cpu", timeout=900)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert publish.read_manifest(adapters / "from-tuned")["init_from"]["path"] == str((adapters / "tuned").resolve())
    assert publish.read_manifest(adapters / "tuned-copy")["init_from"]["path"] == str((adapters / "sft-1").resolve())


@pytest.mark.slow
def test_a_dependency_that_fails_fails_the_waiting_job_and_a_retry_makes_it_wait_again(workdir: Path) -> None:
    home = workdir / ".loraq"
    # An eval-loss gate no adapter can meet: sft-1 trains, fails inspection (permanent), and is never published.
    loraq(home, "submit", str(write_queue(workdir, DEFAULTS + """
jobs:
  - name: sft-1
    dataset: ./data/support.jsonl
    training: {max_steps: 2}
    validation: {split: 0.1, min_eval_loss_drop: 100.0}
  - name: sft-2
    dataset: ./data/support.jsonl
    after: sft-1
""")))
    ran = loraq(home, "run", "--devices", "cpu", timeout=900, check=False)
    assert ran.returncode == 1, ran.stdout + ran.stderr  # returns: nothing left that could run
    assert "[sft-2] failed: dependency: after: sft-1 failed; 'loraq retry sft-1'" in ran.stdout
    state = jobs(home)
    assert (state["sft-1"]["status"], state["sft-1"]["error_kind"]) == (FAILED, "inspection")
    assert (state["sft-2"]["status"], state["sft-2"]["error_kind"], state["sft-2"]["attempts"]) == (FAILED, "dependency", 0)
    assert state["sft-2"]["error"].startswith("after: sft-1 failed; 'loraq retry sft-1' makes this job wait on it "
                                              "again: inspection: adapter failed inspection")
    assert not query(home, "SELECT * FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.name = 'sft-2'")
    assert "dependency: after: sft-1 failed" in loraq(home, "status").stdout
    refused = loraq(home, "retry", "sft-2", check=False)
    assert refused.returncode == 1 and "'loraq retry sft-1' instead" in refused.stdout + refused.stderr
    loraq(home, "retry", "sft-1")
    rows = status_rows(home)
    assert (rows["sft-2"]["status"], rows["sft-2"]["waiting_on"]) == (PENDING, "sft-1")


@pytest.mark.slow
def test_a_cancelled_dependency_fails_the_waiting_job_and_run_returns(workdir: Path) -> None:
    home = workdir / ".loraq"
    loraq(home, "submit", str(write_queue(workdir, DEFAULTS + """
jobs:
  - name: sft-1
    dataset: ./data/support.jsonl
  - name: sft-2
    dataset: ./data/support.jsonl
    after: sft-1
  - name: sft-3
    dataset: ./data/support.jsonl
    after: sft-2
""")))
    loraq(home, "cancel", "sft-1")
    rows = status_rows(home)
    assert (rows["sft-2"]["status"], rows["sft-2"]["error_kind"]) == (FAILED, "dependency")
    assert rows["sft-2"]["error"] == "after: sft-1 cancelled; 'loraq retry sft-1' makes this job wait on it again"
    assert rows["sft-3"]["error"].startswith("after: sft-2 failed because sft-1 cancelled; 'loraq retry sft-1'")
    ran = loraq(home, "run", "--devices", "cpu", timeout=600, check=False)
    assert ran.returncode == 1 and "0 completed · 2 failed · 0 pending · 0 running · 1 cancelled" in ran.stdout
    assert not query(home, "SELECT * FROM attempts")  # nothing was ever claimed
    refused = loraq(home, "submit", str(write_queue(workdir, DEFAULTS + """
jobs:
  - name: sft-4
    dataset: ./data/support.jsonl
    after: sft-1
""", name="more.yaml")), check=False)
    assert refused.returncode == 1
    assert "job 'sft-4': after: sft-1 is cancelled in" in refused.stderr and "'loraq retry sft-1' first" in refused.stderr


@pytest.mark.slow
def test_kill9_while_a_dependent_job_waits_loses_nothing_and_the_dependency_holds_after_restart(
        workdir: Path, tmp_path: Path) -> None:
    home = workdir / ".loraq"
    long = "{max_steps: 40, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 4, eval_steps: 40, " \
           "logging_steps: 1, seed: 3}"
    loraq(home, "submit", str(write_queue(workdir, DEFAULTS + f"""
jobs:
  - name: sft-1
    dataset: ./data/support.jsonl
    training: {long}
  - name: sft-2
    dataset: ./data/support.jsonl
    after: sft-1
    priority: 10
""")))

    def waiting_untouched() -> None:
        state = jobs(home)
        assert (state["sft-2"]["status"], state["sft-2"]["attempts"]) == (PENDING, 0), state["sft-2"]
        assert not query(home, "SELECT * FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.name = 'sft-2'")

    def trained_to(step: int) -> bool:
        rows = query(home, "SELECT a.last_step FROM attempts a JOIN jobs j ON j.id = a.job_id "
                           "WHERE j.name = 'sft-1' AND a.ended_at IS NULL")
        return bool(rows) and (rows[0]["last_step"] or 0) >= step

    # Two trainer slots: the idle one would take sft-2 at once if the dependency let it.
    worker = Worker(home, "--lease", "5", log=tmp_path / "worker-1.log", devices="cpu,cpu")
    wait_for(lambda: trained_to(5), timeout=STARTUP_S * 2, what="sft-1 to train past a checkpoint")
    waiting_untouched()
    worker.kill9()
    assert integrity(home) == "ok"
    waiting_untouched()
    assert query(home, "SELECT j.name FROM dependencies d JOIN jobs j ON j.id = d.after_id") == [{"name": "sft-1"}]

    worker = Worker(home, "--lease", "5", log=tmp_path / "worker-2.log", devices="cpu,cpu")
    # The restarted worker takes sft-1 back (its dead predecessor's lease reclaimed) and trains on; sft-2 still waits.
    wait_for(lambda: len(query(home, "SELECT * FROM attempts a JOIN jobs j ON j.id = a.job_id "
                                     "WHERE j.name = 'sft-1' AND a.last_step IS NOT NULL")) >= 2 and trained_to(1),
             timeout=STARTUP_S * 2, what="sft-1 to train again after the restart")
    waiting_untouched()
    assert worker.wait() == 0, worker.output()
    assert integrity(home) == "ok"
    assert completions(home) == {"sft-1": 1, "sft-2": 1}
    done = [e["id"] for e in events(home, "sft-1") if e["to_state"] == COMPLETED]
    claimed = [e["id"] for e in events(home, "sft-2") if (e["from_state"], e["to_state"]) == (PENDING, RUNNING)]
    assert len(claimed) == 1 and claimed[0] > done[0]
    check_published(home, {"sft-1", "sft-2"})
    manifest = publish.read_manifest(home / "adapters" / "sft-2")
    assert manifest["init_from"]["path"] == str((home / "adapters" / "sft-1").resolve())
