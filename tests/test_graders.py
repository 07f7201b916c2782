"""Graders beyond exact match, the model judge and the general metric gate (issue 24).

Each grader against values computed by hand; the judge against a real HTTP server on
127.0.0.1 that answers the chat-completions shape (a good one, one that fails, one that
hangs past the timeout); the schema of ``validation`` and ``tracking``; the verdict's
``validation.min`` gate.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from loraq.inspect import Inspection, metric_gate, verdict
from loraq.model import graders, judge
from loraq.queue.spec import JobSpec, ValidationSpec

# ---------------------------------------------------------------- graders, by hand


def test_rouge_by_hand() -> None:
    # answer "the cat sat on the mat", reference "the cat lay on the mat" (6 tokens each):
    # unigrams in common 5 -> P = R = 5/6; bigrams: the-cat, on-the, the-mat of 5 -> 3/5;
    # longest common subsequence "the cat on the mat" = 5 -> 5/6
    answers, refs = ["the cat sat on the mat"], ["the cat lay on the mat"]
    assert graders.grade("rouge_1", answers, refs) == pytest.approx(5 / 6)
    assert graders.grade("rouge_2", answers, refs) == pytest.approx(3 / 5)
    assert graders.grade("rouge_l", answers, refs) == pytest.approx(5 / 6)
    # a mean over rows: the second row is identical (1.0)
    assert graders.grade("rouge_l", answers + ["a b"], refs + ["a b"]) == pytest.approx((5 / 6 + 1) / 2)
    # ROUGE-L F1 with P != R: answer "a b c" vs reference "a c": LCS 2 -> P 2/3, R 1 -> F = 2PR/(P+R) = 0.8
    assert graders.grade("rouge_l", ["a b c"], ["a c"]) == pytest.approx(0.8)


def test_bleu_by_hand() -> None:
    # hypothesis one word longer than the reference (brevity penalty 1); n-gram precisions
    # 6/7, 5/6, 4/5, 3/4 -> BLEU = (6/7 * 5/6 * 4/5 * 3/4) ** (1/4) = (3/7) ** 0.25
    value = graders.grade("bleu", ["the cat sat on the mat today"], ["the cat sat on the mat"])
    assert value == pytest.approx((3 / 7) ** 0.25)
    assert graders.grade("bleu", ["four words right here"], ["four words right here"]) == pytest.approx(1.0)
    assert graders.grade("bleu", ["three words here"], ["three words here"]) == 0.0  # no 4-gram at all: corpus BLEU 0


def test_chrf_by_hand() -> None:
    # "ab" vs "abc": character 1-grams P 2/2, R 2/3; 2-grams P 1/1, R 1/2 (no longer n-grams in
    # the hypothesis): mean P 1, mean R 7/12; chrF (beta 2) = 5PR / (4P + R) = 35/55
    assert graders.grade("chrf", ["ab"], ["abc"]) == pytest.approx(35 / 55)
    assert graders.grade("chrf", ["xyz"], ["xyz"]) == pytest.approx(1.0)


def test_fuzzy_match_by_hand() -> None:
    # kitten / sitting: longest common subsequence "ittn" (4): 2 * 4 / (6 + 7) = 8/13
    assert graders.grade("fuzzy_match", ["kitten"], ["sitting"]) == pytest.approx(8 / 13)


def test_json_graders_by_hand() -> None:
    answers = ['{"a": 1, "b": [2]}', "not json", "[1, 2]", '{"a": 2}']
    refs = ['{"b": [2], "a": 1}', '{"a": 1}', "[1, 2]", '{"a": 1}']
    assert graders.grade("json_valid", answers, refs) == pytest.approx(3 / 4)
    assert graders.grade("json_match", answers, refs) == pytest.approx(2 / 4)  # key order does not matter
    assert graders.grade("json_match", ['{"a": 1}'], ["a reference that is not JSON"]) == 0.0


def test_string_checks_by_hand() -> None:
    answers = ["Thanks! - Sam, Acme", "Sure. - Sam, Acme", "bye", "555-1234"]
    refs = [""] * 4
    checks = graders.Checks(contains="- Sam, Acme", regex=r"^\d{3}-\d{4}$")
    assert graders.grade("contains", answers, refs, checks) == pytest.approx(2 / 4)
    assert graders.grade("regex", answers, refs, checks) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="validation.contains"):
        graders.grade("contains", answers, refs)


def test_a_regex_that_backtracks_past_its_time_is_unmeasured_not_stuck() -> None:
    checks = graders.Checks(regex=r"(a*)*[^a]")
    assert math.isnan(graders.grade("regex", ["a" * 2000], ["x"], checks))
    assert graders.grade_all(["regex", "fuzzy_match"], ["a" * 2000], ["a" * 2000], checks) == {"fuzzy_match": 1.0}


def test_answers_and_references_are_trimmed_and_no_rows_is_unmeasured() -> None:
    assert graders.grade("exact_match", ["  42\n"], ["42 "]) == 1.0
    assert math.isnan(graders.grade("rouge_l", [], []))
    with pytest.raises(ValueError, match="unknown grader"):
        graders.grade("perplexity", ["a"], ["a"])


# ---------------------------------------------------------------- the schema


BASE = {"name": "j", "base_model": "org/model", "dataset": "d.jsonl"}


def test_metrics_gates_patterns_and_early_stopping_are_checked() -> None:
    spec = JobSpec.model_validate(BASE | {"validation": {"metrics": ["rouge_l", "contains"], "contains": "- Sam",
                                                         "min": {"rouge_l": 0.4},
                                                         "early_stopping": {"metric": "rouge_l"}}})
    assert spec.validation.min == {"rouge_l": 0.4}
    for validation, message in [
        ({"metrics": ["rouge_9"]}, "is not a metric loraq measures"),
        ({"metrics": ["bleu"], "min": {"rouge_l": 0.4}}, "min.rouge_l gates on a metric this job does not measure"),
        ({"metrics": ["regex"]}, "the regex metric needs a pattern"),
        ({"metrics": ["regex"], "regex": "(unclosed"}, "is not a valid regex"),
        ({"metrics": ["bleu"], "early_stopping": {"metric": "chrf"}}, "early_stopping.metric 'chrf'"),
        ({"metrics": ["bleu"], "min": {"bleu": float("nan")}}, "finite"),
        ({"judge": {"endpoint": "file:///etc/passwd", "model": "m", "rubric": "r"}}, "http"),
    ]:
        with pytest.raises(ValueError, match=message):
            ValidationSpec.model_validate(validation)
    judged = ValidationSpec.model_validate({"judge": {"endpoint": "http://127.0.0.1:9/v1/", "model": "m",
                                                      "rubric": "r"}, "min": {"judge": 0.5}})
    assert judged.measured == ["judge"] and judged.judge is not None and judged.judge.endpoint == "http://127.0.0.1:9/v1"


def test_tracking_is_checked_and_a_queue_level_block_reaches_every_job(tmp_path: Any) -> None:
    from loraq.queue.spec import queue_from_doc
    from loraq.sandbox import Roots

    with pytest.raises(ValueError, match="tracking server"):
        JobSpec.model_validate(BASE | {"tracking": {"report_to": ["mlflow"], "mlflow_uri": "file:///tmp/x"}})
    with pytest.raises(ValueError, match="relative to the home"):
        JobSpec.model_validate(BASE | {"tracking": {"report_to": "tensorboard", "tensorboard_dir": "../out"}})
    with pytest.raises(ValueError, match="report_to"):
        JobSpec.model_validate(BASE | {"tracking": {"report_to": ["comet"]}})
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    doc = {"tracking": {"report_to": ["tensorboard"], "experiment": "exp"},
           "jobs": [{"name": "a", "base_model": "org/model", "dataset": "d.jsonl"},
                    {"name": "b", "base_model": "org/model", "dataset": "d.jsonl",
                     "tracking": {"report_to": ["wandb"]}}]}
    queue = queue_from_doc(doc, tmp_path / "q.yaml", Roots.of([str(tmp_path)]), where="q.yaml")
    a, b = (job.spec.tracking for job in queue.jobs)
    assert a is not None and a.report_to == ["tensorboard"] and a.experiment == "exp"
    assert b is not None and b.report_to == ["wandb"] and b.experiment == "exp"  # the job's list wins, the rest merges


# ---------------------------------------------------------------- the verdict's metric gate


@dataclass
class Trained:
    base_eval_loss: float | None = 2.0
    eval_loss: float | None = 1.0
    metrics: dict[str, float] = field(default_factory=dict)


def test_validation_min_gates_any_metric_and_a_missing_judge_only_warns() -> None:
    report = Inspection("/a", [])
    validation = ValidationSpec.model_validate({"metrics": ["rouge_l", "exact_match"], "min_exact_match": 0.5,
                                                "min": {"rouge_l": 0.4}})
    passed = verdict(report, Trained(metrics={"rouge_l": 0.5, "base_rouge_l": 0.2, "exact_match": 0.5}), validation)
    assert passed.passed and passed.quality is not None
    assert passed.quality["metrics"]["rouge_l"] == {"base": 0.2, "adapter": 0.5}
    assert passed.quality["min"] == {"rouge_l": 0.4, "exact_match": 0.5}
    failed = verdict(report, Trained(metrics={"rouge_l": 0.3, "base_rouge_l": 0.2, "exact_match": 0.5}), validation)
    assert [f.code for f in failed.errors()] == ["metric_gate"]
    assert "rouge_l 0.300 (the base's: 0.200) on the eval prompts is below validation.min.rouge_l 0.400" in \
        failed.errors()[0].message
    assert metric_gate("rouge_l", None, 0.4) is not None and metric_gate("rouge_l", None, 0.4).severity == "error"
    judged = ValidationSpec.model_validate({"judge": {"endpoint": "http://127.0.0.1:9/v1", "model": "m",
                                                      "rubric": "r"}, "min": {"judge": 0.5}})
    unjudged = verdict(report, Trained(), judged)
    assert unjudged.passed and [f.severity for f in unjudged.findings] == ["warning"]
    assert verdict(report, Trained(metrics={"judge": 0.2, "base_judge": 0.1}), judged).passed is False


# ---------------------------------------------------------------- the judge, against a real local server


@dataclass
class Stub:
    """What the local chat-completions server does: the reply per request, and what it was asked."""

    mode: str = "ok"  # ok | fail | hang | words
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                state.in_flight += 1
                state.most_in_flight = max(state.most_in_flight, state.in_flight)
            try:
                if state.mode == "hang":
                    state.release.wait(10)
                if state.mode == "fail":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "overloaded"}}')
                    return
                answer = body["messages"][1]["content"].rsplit("ANSWER:\n", 1)[1]
                # a judge that gives 10 to an answer holding "good", else 4
                content = "no score" if state.mode == "words" else ("10" if "good" in answer else "Score: 4")
                reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            finally:
                with state.lock:
                    state.in_flight -= 1

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


def test_the_judge_scores_each_answer_with_the_documented_prompt(stub: tuple[Stub, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    state, url = stub
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    settings = judge.JudgeSettings(endpoint=url, model="grader-1", rubric="Be kind.", api_key_env="JUDGE_KEY",
                                   concurrency=2)
    prompts = [f"Q{i}" for i in range(6)]
    result = judge.judge(settings, prompts, ["ref"] * 6, ["good", "bad", "good", "bad", "bad", "bad"])
    assert result.score == pytest.approx((1.0 * 2 + 0.4 * 4) / 6) and result.errors == []
    assert len(state.requests) == 6 and state.most_in_flight <= 2
    first = state.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "grader-1" and first["body"]["temperature"] == 0
    assert first["body"]["messages"] == judge.messages("Be kind.", first["body"]["messages"][1]["content"]
                                                       .split("\n")[1], "ref",
                                                       first["body"]["messages"][1]["content"].rsplit("\n", 1)[1])
    assert "Be kind." in first["body"]["messages"][0]["content"]


@pytest.mark.parametrize("mode", ["fail", "hang", "words"])
def test_a_judge_that_fails_times_out_or_gives_no_score_leaves_the_metric_unmeasured(
        stub: tuple[Stub, str], mode: str) -> None:
    state, url = stub
    state.mode = mode
    settings = judge.JudgeSettings(endpoint=url, model="m", rubric="r", timeout_s=0.5, concurrency=4)
    result = judge.judge(settings, ["q1", "q2"], ["r", "r"], ["good", "good"])
    assert result.score is None and result.errors, result


def test_a_judge_nobody_listens_for_is_unmeasured() -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing answers there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = judge.judge(judge.JudgeSettings(endpoint=f"http://127.0.0.1:{port}/v1", model="m", rubric="r",
                                             timeout_s=1), ["q"], ["r"], ["a"])
    assert result.score is None and result.errors


# ---------------------------------------------------------------- ranking by the gate metric


def test_a_halving_round_ranks_by_the_grader_that_gates_the_sweep() -> None:
    from loraq.queue import halving

    members = [halving.Member("a", True, 1.0, score=0.2), halving.Member("b", True, 2.0, score=0.9),
               halving.Member("c", True, 1.5, score=None), halving.Member("d", False, None)]
    by_loss = halving.decide(1, 2, members)
    assert [v.name for v in by_loss] == ["a", "c", "b", "d"]
    by_rouge = halving.decide(1, 2, members, metric="rouge_l")
    assert [v.name for v in by_rouge] == ["b", "a", "c", "d"] and [v.kept for v in by_rouge] == [True, True, False,
                                                                                                 False]
    assert "rouge_l 0.9000 ranked 1 of 4" in by_rouge[0].reason and "no rouge_l" in by_rouge[2].reason


def test_the_report_ranks_a_sweep_by_the_metric_that_gated_it() -> None:
    from loraq.report import gate_metric, sweeps_of

    def job(i: int, loss: float, rouge: float | None, status: str = "completed") -> dict[str, Any]:
        return {"id": i, "name": f"s-{i}", "group": "s", "status": status, "eval_loss": loss, "base_eval_loss": 3.0,
                "gate_metric": gate_metric({"min": {"rouge_l": 0.1}}),
                "metrics": {} if rouge is None else {"rouge_l": rouge, "base_rouge_l": 0.1}, "sweep": {"lr": i}}

    (sweep,) = sweeps_of([job(1, 1.0, 0.3), job(2, 2.0, 0.8), job(3, 0.5, None), job(4, 0.9, 0.95, "failed")]).values()
    assert sweep["metric"] == "rouge_l" and sweep["higher_is_better"] and sweep["best"] == "s-2"
    assert [e["name"] for e in sweep["ranking"]] == ["s-2", "s-1", "s-4", "s-3"]
    assert sweep["ranking"][0]["value"] == 0.8 and sweep["ranking"][0]["base_value"] == 0.1
    assert gate_metric({"min_exact_match": 0.5}) == "exact_match" and gate_metric({}) is None


def test_the_store_decides_a_round_by_the_score_the_worker_reports(tmp_path: Any) -> None:
    """What the worker passes at a round's end (the sweep's gate metric and the adapter's value) decides it."""
    from loraq.queue import halving
    from loraq.queue.store import NewJob, Store, WorkerId

    with Store.open(tmp_path / "loraq.db") as store:
        plan = halving.plan(2, 4)
        store.enqueue([NewJob(name=n, spec={"spec": {"name": n, "group": "g", "training": {"max_steps": 2}},
                                            "halving": plan}, base_key="b", max_retries=0) for n in ("a", "b")])
        worker = WorkerId("h", 1, "t")
        claims = {c.job.name: c for c in (store.claim(worker, lease_s=60) for _ in range(2)) if c is not None}
        # 'a' has the lower eval loss, 'b' the higher ROUGE-L: the sweep gates on rouge_l, so 'b' goes on
        assert store.end_round(claims["a"].job.id, claims["a"].epoch, steps=2, eval_loss=1.0, metric="rouge_l",
                               score=0.2)
        assert store.end_round(claims["b"].job.id, claims["b"].epoch, steps=2, eval_loss=2.0, metric="rouge_l",
                               score=0.7)
        after = {job.name: job for job in store.jobs()}
        assert after["b"].status == "pending" and after["b"].halving is not None and after["b"].halving.round == 2
        assert after["a"].status == "cancelled" and "rouge_l 0.2000 ranked 2 of 2" in after["a"].error


def test_status_shows_each_grader_base_to_adapter_in_a_column_of_its_own(tmp_path: Any) -> None:
    """What a job's graders scored (issue 24) is a column of ``loraq status`` and in ``status --json``, as exact match is."""
    import subprocess

    from conftest import LORAQ
    from loraq.queue.store import NewJob, Store, WorkerId
    from loraq.workspace import Home

    home = Home(tmp_path / "home")
    home.ensure()
    with Store.open(home.db_path) as store:
        store.enqueue([NewJob(name=n, spec={"spec": {"name": n}}, base_key="b") for n in ("graded", "plain")])
        claim = store.claim(WorkerId("h", 1, "t"), lease_s=60)
        assert claim is not None and claim.job.name == "graded"
        store.complete(claim.job.id, claim.epoch, result={"metrics": {
            "rouge_l": 0.8125, "base_rouge_l": 0.25, "bleu": 0.5, "base_bleu": 0.125, "exact_match": 0.5,
            "base_exact_match": 0.0, "eval_loss": 1.0}})
    shown = subprocess.run([LORAQ, "--home", str(home.root), "status"], capture_output=True, text=True, check=True)
    header, *lines = [line for line in shown.stdout.splitlines() if line.strip()]
    assert "bleu base -> adapter" in header and "rouge_l base -> adapter" in header, shown.stdout
    assert "exact match base -> adapter" in header and "eval_loss base" not in header
    graded = next(line for line in lines if line.startswith("graded"))
    assert "0.125 -> 0.500" in graded and "0.250 -> 0.812" in graded, shown.stdout
    plain = next(line for line in lines if line.startswith("plain"))
    assert "->" not in plain.split("pending", 1)[1].replace("- -> -", ""), shown.stdout
    listed = json.loads(subprocess.run([LORAQ, "--home", str(home.root), "status", "--json"], capture_output=True,
                                       text=True, check=True).stdout)
    rows = {row["name"]: row for row in listed["jobs"]}
    assert rows["graded"]["graded"] == {"bleu": {"base": 0.125, "adapter": 0.5},
                                        "rouge_l": {"base": 0.25, "adapter": 0.8125}}
    assert rows["plain"]["graded"] == {}
