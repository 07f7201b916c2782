"""Real queues through the worker and one trainer process: hot bases, grouping by base, recycling.

Not timings (those are in benchmarks/): what the throughput rests on. A queue
interleaving two bases runs grouped by base and loads each once; every job's
memory is recorded; a trainer whose memory grew past the limit is replaced, and
the queue goes on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY_DEFAULTS, write_queue
from loraq import api
from loraq.model.batching import Collator
from loraq.model.evaluation import evaluate_loss
from loraq.protocol import JobInput
from loraq.queue.store import Job, Store
from loraq.train.prepare import prepare
from loraq.workspace import Home

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, demo_datasets: dict[str, Path]) -> Path:
    """models/tiny (base A), models/other (base B: another seed, other weights and tokenizer), data/."""
    from loraq.demo import build_model

    root = tmp_path_factory.mktemp("throughput")
    shutil.copytree(tiny_model, root / "models" / "tiny")
    build_model(root / "models" / "other", seed=1, pretrain_steps=10)
    (root / "data").mkdir()
    for path in demo_datasets.values():
        shutil.copy(path, root / "data" / path.name)
    return root


def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainer processes on one thread: steadier on a machine shared with other tests."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def run_queue(project: Path, home: Path, body: str, **options: Any) -> tuple[api.RunResult, list[api.RunEvent]]:
    queue = write_queue(project, TINY_DEFAULTS + body, name=f"{home.name}.yaml")
    api.submit(queue, home=Home(home))
    seen: list[api.RunEvent] = []
    result = api.run(Home(home), api.RunOptions(devices="cpu", **options), observer=seen.append)
    return result, seen


def jobs_in_start_order(home: Path) -> list[Job]:
    with Store.open(Home(home).db_path, create=False) as store:
        return sorted(store.jobs(), key=lambda j: j.started_at or 0.0)


INTERLEAVED = """
jobs:
  - name: a1
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
  - name: b1
    base_model: ./models/other
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
  - name: a2
    dataset: ./data/stories.jsonl
  - name: b2
    base_model: ./models/other
    dataset: ./data/stories.jsonl
"""


@pytest.fixture(scope="module")
def interleaved(project: Path) -> dict[str, Any]:
    """The queue A, B, A, B run once on one trainer."""
    home = project / "interleaved"
    with pytest.MonkeyPatch.context() as mp:
        one_thread(mp)
        result, seen = run_queue(project, home, INTERLEAVED)
    return {"home": home, "result": result, "seen": seen, "jobs": jobs_in_start_order(home)}


def test_a_queue_interleaving_two_bases_runs_grouped_by_base_and_loads_each_once(interleaved: dict[str, Any]) -> None:
    jobs = interleaved["jobs"]
    assert interleaved["result"].ok and [j.status for j in jobs] == ["completed"] * 4
    assert [j.name for j in jobs] == ["a1", "a2", "b1", "b2"]  # the trainer's hot base first, within one priority
    results = [j.result for j in jobs]
    assert [r["base_reused"] for r in results] == [False, True, False, True]
    assert [r["base_loads"] for r in results] == [1, 1, 2, 2]  # each base loaded once, in one trainer process
    assert len({r["pid"] for r in results}) == 1
    started = [e for e in interleaved["seen"] if isinstance(e, api.JobStarted)]
    assert [(e.name, e.event.base_reused) for e in started] == [("a1", False), ("a2", True), ("b1", False), ("b2", True)]


def test_each_adapter_was_trained_on_its_own_base(interleaved: dict[str, Any], project: Path) -> None:
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for job in interleaved["jobs"]:
        base = project / "models" / ("tiny" if job.name.startswith("a") else "other")
        adapter = Path(job.result["adapter"])
        assert json.loads((adapter / "loraq-manifest.json").read_text())["base_model"] == str(base)
        if job.name != "b1":
            continue
        # The published adapter on a fresh load of its base reproduces the eval loss the job recorded.
        tokenizer = AutoTokenizer.from_pretrained(base)
        rows = prepare(JobInput.of_stored(job.spec.doc), tokenizer).eval
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        loss = evaluate_loss(model, rows, Collator(tokenizer.pad_token_id), 8)
        assert loss == pytest.approx(job.eval_loss, rel=1e-4)


def test_every_job_records_its_memory_in_its_result_and_in_the_metrics(interleaved: dict[str, Any]) -> None:
    with Store.open(Home(interleaved["home"]).db_path, create=False) as store:
        for job in interleaved["jobs"]:
            assert job.result["memory"]["rss_mb"] > 50
            rss = [m for m in store.metrics(job.id) if m["name"] == "rss_mb"]
            assert [m["value"] for m in rss] == [job.result["memory"]["rss_mb"]]
            assert rss[0]["step"] == job.result["steps"]


def test_status_reads_the_light_listing_and_shows_what_the_full_jobs_say(interleaved: dict[str, Any]) -> None:
    home = Home(interleaved["home"])
    with Store.open(home.db_path, create=False) as store:
        full = [api.JobRow.of(job) for job in store.jobs()]
    assert api.status(home).jobs == full
    assert all(row.adapter for row in full)


def test_a_trainer_whose_memory_grew_past_the_limit_is_recycled_and_the_queue_goes_on(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one_thread(monkeypatch)
    home = project / "recycled"
    # A limit no RSS reading can stay under (RSS may also shrink a little between jobs, so -1
    # would be flaky): the trainer is replaced after job 2, the first compared with job 1.
    result, seen = run_queue(project, home, """
jobs:
  - name: r1
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
  - name: r2
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
  - name: r3
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
""", recycle_growth_mb=-1e9)
    jobs = jobs_in_start_order(home)
    assert result.ok and [j.status for j in jobs] == ["completed"] * 3
    assert all(j.attempts == 1 for j in jobs)
    pids = [j.result["pid"] for j in jobs]
    assert pids[0] == pids[1] != pids[2]
    recycled = [e for e in seen if isinstance(e, api.Recycled)]
    assert len(recycled) == 1 and recycled[0].rss_mb == jobs[1].result["memory"]["rss_mb"]
    assert not _alive(pids[0])  # the old trainer is gone, not left beside the new one
    # The new trainer loads the base afresh.
    assert jobs[2].result["base_reused"] is False and jobs[2].result["base_loads"] == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
