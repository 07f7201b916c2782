"""The OpenAI-compatible fine-tuning API under /v1 of ``loraq serve``, driven by the official ``openai`` client.

A real ``loraq serve`` process on 127.0.0.1 and a real ``loraq run --wait`` worker,
over a home whose config.yaml offers the suite's tiny model as ``tiny``. Two keys
(two tenants) come from ``loraq keys create``. Everything the client does is what a
user's existing OpenAI code does, with only ``base_url`` and ``api_key`` changed.
Bad input goes over plain HTTP too (httpx): each refusal is OpenAI's error shape and
a 4xx, never a 500.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai", reason="the API tests drive the official client: pip install 'loraq[api]'")
pytest.importorskip("multipart", reason="uploads need python-multipart: pip install 'loraq[api]'")
httpx = pytest.importorskip("httpx")

from conftest import LORAQ
from dashboard import start_cli_server, stop

MAX_BODY = 64 * 1024
MAX_UPLOAD = 2 * 1024 * 1024
#: Tiny jobs: a few steps of the tiny model (hyperparameters stay auto; max_steps caps the run).
FAST = {"max_steps": 4, "lora_r": 4, "lora_alpha": 8, "training": {"save_steps": 2, "logging_steps": 1,
                                                                     "max_seq_len": 64}}


@dataclass
class Service:
    home: Path
    base_url: str
    token: str
    keys: dict[str, str]
    data: dict[str, Path]

    def client(self, key: str) -> Any:
        return openai.OpenAI(base_url=self.base_url, api_key=self.keys.get(key, key), max_retries=0, timeout=120)

    def raw(self, method: str, path: str, key: str = "alice", **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.keys.get(key, key)}", **kwargs.pop("headers", {})}
        return httpx.request(method, self.base_url + path, headers=headers, timeout=60, **kwargs)


def loraq(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def service(tiny_model: Path, demo_datasets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("api")
    home = root / "home"
    home.mkdir()
    (home / "config.yaml").write_text(f"models:\n  tiny: {tiny_model}\n"
                                      f"api: {{max_body_bytes: {MAX_BODY}, max_upload_bytes: {MAX_UPLOAD}}}\n",
                                      encoding="utf-8")
    keys = {}
    for name in ("alice", "bob"):
        made = loraq(home, "keys", "create", name)
        assert made.returncode == 0, made.stderr
        keys[name] = made.stdout.strip()
    from loraq.workspace import Home

    server, link = start_cli_server(Home(home), loraq=LORAQ)
    base, _, token = link.partition("/?token=")
    worker = subprocess.Popen([LORAQ, "--home", str(home), "run", "--wait", "--devices", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield Service(home, base + "/v1", token, keys, demo_datasets)
    finally:
        stop(worker)
        stop(server)


def wait_for(client: Any, job_id: str, statuses: tuple[str, ...], limit_s: float = 400) -> Any:
    """Poll the job until its status is one of ``statuses`` (the limit only stops a hung test)."""
    deadline = time.monotonic() + limit_s
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def upload(client: Any, path: Path) -> Any:
    with open(path, "rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune")


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ---------------------------------------------------------------- the whole workflow


def test_a_dpo_job_from_an_openai_preference_upload(service: Service, tmp_path: Path) -> None:
    """OpenAI's DPO file format passes the upload check, and method dpo with beta trains a preference job."""
    rows = [{"input": {"messages": [{"role": "user", "content": f"Greet visitor {i}."}]},
             "preferred_output": [{"role": "assistant", "content": f"Hello, visitor {i}!"}],
             "non_preferred_output": [{"role": "assistant", "content": "Go away."}]} for i in range(24)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    client = service.client("alice")
    training = upload(client, path)
    assert training.status == "processed"
    job = client.fine_tuning.jobs.create(model="tiny", training_file=training.id, suffix="prefs",
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25}}},
                                         extra_body=FAST)
    assert job.method is not None and job.method.type == "dpo"
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    shown = json.loads(loraq(service.home, "show", job.id, "--json").stdout)
    assert shown["job"]["spec"]["spec"]["method"]["beta"] == 0.25
    assert shown["job"]["result"]["metrics"]["preference_accuracy"] >= 0.0


@pytest.mark.slow
def test_upload_train_with_auto_events_checkpoints_and_the_model_answers(service: Service) -> None:
    client = service.client("alice")
    training = upload(client, service.data["support"])
    assert training.object == "file" and training.status == "processed" and training.filename == "support.jsonl"
    assert client.files.retrieve(training.id).bytes == service.data["support"].stat().st_size
    assert client.files.content(training.id).read() == service.data["support"].read_bytes()

    job = client.fine_tuning.jobs.create(model="tiny", training_file=training.id, suffix="support",
                                         hyperparameters={"n_epochs": "auto", "batch_size": "auto",
                                                          "learning_rate_multiplier": "auto"},
                                         metadata={"team": "support"}, extra_body=FAST)
    assert job.status in ("queued", "running") and job.model == "tiny" and job.fine_tuned_model is None
    assert job.metadata == {"team": "support"}
    # "auto" was resolved at submit, by loraq's rules, and says what it became
    assert isinstance(job.hyperparameters.batch_size, int) and isinstance(job.hyperparameters.n_epochs, int)
    # a loraq job like any other: the CLI sees it by the API's id
    status = json.loads(loraq(service.home, "status", "--json").stdout)
    assert job.id in [row["name"] for row in status["jobs"]]

    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:support:{job.id}"
    assert done.finished_at is not None

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    kinds = {event.type for event in events}
    assert kinds == {"message", "metrics"}
    steps = [event.data for event in events if event.type == "metrics" and "train_loss" in event.data]
    assert steps and all(isinstance(step["step"], int) for step in steps)
    assert any("valid_loss" in event.data for event in events if event.type == "metrics")
    assert events[0].created_at >= events[-1].created_at  # newest first, as OpenAI lists them
    assert "succeeded" in [e for e in events if e.type == "message"][0].message
    first_page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(first_page.data) == 2 and first_page.has_more

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints, "the published adapter is the final checkpoint"
    assert all(c.fine_tuned_model_checkpoint.startswith(done.fine_tuned_model) for c in checkpoints)
    assert checkpoints[0].step_number == 4 and checkpoints[0].metrics.train_loss is not None

    assert {"tiny", done.fine_tuned_model} <= {m.id for m in client.models.list()}

    question = [{"role": "user", "content": "Hello, I need a refund."}]
    answer = client.chat.completions.create(model=done.fine_tuned_model, messages=question, max_tokens=12,
                                            temperature=0)
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.usage.completion_tokens >= 1 and answer.choices[0].finish_reason in ("stop", "length")
    text = answer.choices[0].message.content
    streamed = client.chat.completions.create(model=done.fine_tuned_model, messages=question, max_tokens=12,
                                              temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in streamed:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        else:
            usage = chunk.usage
    assert "".join(pieces) == text  # greedy: the stream says what the whole answer said
    assert usage is not None and usage.completion_tokens == answer.usage.completion_tokens
    base = client.chat.completions.create(model="tiny", messages=question, max_tokens=12, temperature=0)
    assert base.model == "tiny"

    # stop sequences cut the answer before them, as OpenAI's do
    if len(text) > 3:
        stop = text[2:4]
        cut = client.chat.completions.create(model=done.fine_tuned_model, messages=question, max_tokens=12,
                                             temperature=0, stop=[stop])
        assert cut.choices[0].message.content == text[:text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model=done.fine_tuned_model, messages=question, max_tokens=12,
                                                     temperature=0, stop=[stop], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[:text.find(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"
    # a checkpoint's name is a model too: a succeeded job's final one is its published adapter
    final = client.chat.completions.create(model=checkpoints[0].fine_tuned_model_checkpoint, messages=question,
                                           max_tokens=12, temperature=0)
    assert final.model == checkpoints[0].fine_tuned_model_checkpoint
    assert final.choices[0].message.content == text
    plain = client.completions.create(model=done.fine_tuned_model, prompt="Once upon a time", max_tokens=5,
                                      temperature=0)
    assert plain.object == "text_completion" and plain.usage.completion_tokens <= 5
    pieces = [c.choices[0].text for c in client.completions.create(
        model=done.fine_tuned_model, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True)]
    assert "".join(pieces) == plain.choices[0].text

    # another tenant sees none of it
    other = service.client("bob")
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.list_events(job.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(training.id)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=done.fine_tuned_model, messages=question, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=checkpoints[0].fine_tuned_model_checkpoint, messages=question,
                                      max_tokens=2)
    assert done.fine_tuned_model not in {m.id for m in other.models.list()}
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    # the operator (the dashboard's token) sees all
    operator = service.client(service.token)
    assert operator.fine_tuning.jobs.retrieve(job.id).status == "succeeded"


@pytest.mark.slow
def test_pause_and_resume_then_cancel(service: Service) -> None:
    client = service.client("alice")
    training = upload(client, service.data["sql"])
    job = client.fine_tuning.jobs.create(model="tiny", training_file=training.id, extra_body=FAST)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.pause(job.id)  # already paused
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("queued", "running", "succeeded")
    assert wait_for(client, job.id, ("succeeded", "failed")).status == "succeeded"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)  # only a paused job resumes

    second = client.fine_tuning.jobs.create(model="tiny", training_file=training.id, extra_body=FAST)
    cancelled = client.fine_tuning.jobs.cancel(second.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(second.id)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(second.id)]
    assert any("cancelled" in m for m in messages)
    with pytest.raises(openai.NotFoundError):
        service.client("bob").fine_tuning.jobs.cancel(job.id)


@pytest.mark.slow
def test_a_running_job_paused_resumes_from_its_checkpoint(service: Service) -> None:
    client = service.client("alice")
    training = upload(client, service.data["support"])
    job = client.fine_tuning.jobs.create(model="tiny", training_file=training.id, extra_body={
        **FAST, "max_steps": 120, "training": {"save_steps": 5, "logging_steps": 1, "max_seq_len": 64}})
    deadline = time.monotonic() + 400  # only stops a hung test
    while time.monotonic() < deadline:
        steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=5) if e.type == "metrics"]
        if max(steps, default=0) >= 12:
            break
        time.sleep(0.3)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused", paused.status
    listed = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    saved = [c.step_number for c in listed]
    assert saved and min(saved) >= 5 and all(step % 5 == 0 for step in saved)
    # a paused job's checkpoint answers as a model: its folder's adapter, for its own key only
    name = listed[0].fine_tuned_model_checkpoint  # the newest: a pause's last save may prune the oldest
    question = [{"role": "user", "content": "Hello, I need a refund."}]
    answer = client.chat.completions.create(model=name, messages=question, max_tokens=4, temperature=0)
    assert answer.model == name and answer.usage.completion_tokens >= 1
    assert client.models.retrieve(name).id == name
    for refused in (name.rsplit("-", 1)[0] + "-99999", name + "0"):  # a step never saved
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=refused, messages=question, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        service.client("bob").chat.completions.create(model=name, messages=question, max_tokens=2)
    assert client.fine_tuning.jobs.resume(job.id).status in ("queued", "running")
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
    # A graceful pause may save one more checkpoint after it answers: the resume is from the newest, at least max(saved).
    resumed = [int(m.rsplit(" ", 1)[1]) for m in messages if "resumes from checkpoint step" in m]
    assert resumed and resumed[0] >= max(saved), (saved, [m for m in messages if "Step" not in m])


def test_pagination_and_metadata_filters(service: Service) -> None:
    client = service.client("bob")
    training = upload(client, service.data["stories"])
    made = []
    for i in range(5):
        job = client.fine_tuning.jobs.create(model="tiny", training_file=training.id, extra_body=FAST,
                                             metadata={"batch": "pages", "i": str(i)})
        client.fine_tuning.jobs.cancel(job.id)  # no training needed to page through them
        made.append(job.id)
    first = client.fine_tuning.jobs.list(limit=2, metadata={"batch": "pages"})
    assert [j.id for j in first.data] == made[::-1][:2] and first.has_more
    everything = [j.id for j in client.fine_tuning.jobs.list(limit=2, metadata={"batch": "pages"})]  # auto-pages
    assert everything == made[::-1]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"i": "3"})] == [made[3]]
    assert list(client.fine_tuning.jobs.list(metadata={"batch": "none"})) == []
    # alice's jobs are not bob's
    assert not set(made) & {j.id for j in service.client("alice").fine_tuning.jobs.list(limit=100)}
    files = client.files.list()
    assert training.id in [f.id for f in files]
    deleted = client.files.delete(training.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(training.id)


def test_a_deleted_files_content_leaves_the_home_once_no_file_and_no_unfinished_job_needs_it(
        service: Service, tmp_path: Path) -> None:
    client = service.client("bob")
    rows = [json.loads(line) for line in service.data["support"].read_text().splitlines() if line.strip()]
    kept, gone = tmp_path / "kept.jsonl", tmp_path / "gone.jsonl"  # contents no other test uploads
    kept.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    gone.write_text("".join(json.dumps(r, indent=None, sort_keys=True) + "\n" for r in rows[:40]))

    def blob(path: Path) -> Path:
        return service.home / "files" / f"{hashlib.sha256(path.read_bytes()).hexdigest()}.jsonl"

    alone = upload(client, gone)
    assert blob(gone).exists()
    client.files.delete(alone.id)
    assert not blob(gone).exists()  # nothing else needs it: the content leaves with the file

    first, second = upload(client, kept), upload(client, kept)
    client.files.delete(first.id)
    assert blob(kept).exists()  # the second file has the same content
    job = client.fine_tuning.jobs.create(model="tiny", training_file=second.id, extra_body=FAST)
    client.fine_tuning.jobs.cancel(job.id)
    client.files.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(second.id)
    assert blob(kept).exists()  # a cancelled job may be retried, and reads it


def test_a_file_deleted_while_a_job_is_created_from_it_keeps_its_content_for_the_job(
        tiny_model: Path, demo_datasets: dict[str, Path], tmp_path: Path) -> None:
    """The race of DELETE /v1/files/{id} against a create, at its worst moment, made to happen exactly there.

    In-process on a home of its own: the delete runs when the create has enqueued the job
    but not yet recorded it in api.db (the state's clock is the seam: the store already
    has the job when it is asked the time). Without the create's hold the delete finds no
    job on the content and removes it from under the queued job.
    """
    from loraq import api
    from loraq.service import files as files_mod
    from loraq.service import jobs as jobs_mod
    from loraq.service.state import ApiState
    from loraq.workspace import Home

    home = Home(tmp_path / "home")
    home.ensure()
    (home.root / "config.yaml").write_text(f"models:\n  tiny: {tiny_model}\n", encoding="utf-8")
    deletes: list[Any] = []

    def clock() -> float:
        if not deletes and home.db_path.exists():
            with api.open_reader(home) as store:
                enqueued = bool(store.jobs())
            if enqueued:
                deletes.append(None)  # the delete's own reads of the clock do not delete again
                deletes[0] = files_mod.delete(home, state, uploaded.id, 1)
        return time.time()

    state = ApiState.of_home(home.root)
    state.clock = clock
    try:
        key = state.create_key("carol")
        key_id = state.key_for(key).id
        data = demo_datasets["support"].read_bytes()
        uploaded = files_mod.save_upload(home, state, key_id=key_id, filename="support.jsonl", purpose="fine-tune",
                                         chunks=[data], max_bytes=len(data))
        job = jobs_mod.create(home, state, key_id, {"model": "tiny", "training_file": uploaded.id, **FAST})
        assert deletes and deletes[0] is not None and deletes[0].id == uploaded.id, "the delete never ran"
        with api.open_reader(home) as store:
            queued = store.job(job.job_id)
        content = Path(queued.spec.dataset_path)
        assert content.exists() and content.read_bytes() == data  # the queued job can still read what it was given
        with pytest.raises(Exception, match="No such File"):
            state.file(uploaded.id, key_id)
        assert files_mod.purge(home, state) == [] and content.exists()  # the recorded, pending job holds it now
    finally:
        state.close()


# ---------------------------------------------------------------- refusals


def test_a_bad_upload_is_refused_naming_the_row(service: Service, tmp_path: Path) -> None:
    client = service.client("alice")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"messages": [{"role": "wizard", "content": 1}]}\n'
                   + "{not json\n", encoding="utf-8")
    with pytest.raises(openai.BadRequestError) as refused:
        upload(client, bad)
    error = refused.value.body
    assert refused.value.status_code == 400
    assert error["param"] == "line 4" and "line 4" in error["message"] and "line 5" in error["message"]
    assert error["code"] == "invalid_file_format"
    assert "bad.jsonl" not in [f.filename for f in client.files.list()]
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("ok.jsonl", bad.read_bytes()[:10]), purpose="assistants")
    assert purpose.value.body["param"] == "purpose"


def test_keys_are_printed_once_stored_as_hashes_and_can_be_revoked(service: Service) -> None:
    made = loraq(service.home, "keys", "create", "ci")
    assert made.returncode == 0
    assert len(made.stdout.splitlines()) == 1  # KEY=$(loraq keys create ci) works
    key = made.stdout.strip()
    assert key.encode() not in (service.home / "api.db").read_bytes()
    listed = loraq(service.home, "keys", "list", "--json")
    assert "ci" in listed.stdout and key not in listed.stdout
    assert loraq(service.home, "keys", "create", "ci").returncode == 1  # the name is taken
    client = service.client(key)
    assert list(client.fine_tuning.jobs.list()) == []
    assert loraq(service.home, "keys", "revoke", "ci").returncode == 0
    with pytest.raises(openai.AuthenticationError):
        list(client.fine_tuning.jobs.list())
    assert loraq(service.home, "keys", "revoke", "nobody").returncode == 1


def test_wrong_or_missing_keys_are_refused(service: Service) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        service.client("lq-not-a-key").models.list()
    assert wrong.value.body["code"] == "invalid_api_key"
    assert_openai_error(httpx.get(service.base_url + "/models", timeout=30), 401)
    assert_openai_error(service.raw("GET", "/models", headers={"authorization": "Basic abc"}), 401)


def test_bad_input_over_http_gets_openai_errors_never_a_500(service: Service) -> None:
    client = service.client("alice")
    training = upload(client, service.data["support"])
    good = {"model": "tiny", "training_file": training.id}

    def create(body: Any, **kwargs: Any) -> httpx.Response:
        raw = body if isinstance(body, bytes) or not isinstance(body, dict | list) else None
        return service.raw("POST", "/fine_tuning/jobs", content=raw if raw is not None else json.dumps(body),
                           headers={"content-type": "application/json"}, **kwargs)

    assert_openai_error(create(b"{not json"), 400)
    assert_openai_error(create(b""), 400)
    assert_openai_error(create(b"[1, 2]"), 400)
    assert_openai_error(create(b"[" * 100_000 + b"]" * 100_000), 413)  # over max_body_bytes, refused unread

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives, refused once over the limit
        yield b'{"model": "tiny", "suffix": "'
        for _ in range(40):
            yield b"x" * 4096
        yield b'"}'

    assert_openai_error(create(chunked()), 413)
    assert_openai_error(create(b'"' + b"x" * 50_000 + b'"'), 400)
    assert_openai_error(create({**good, "model": 7}), 400, param="model")
    assert_openai_error(create({**good, "seed": "seven"}), 400, param="seed")
    assert_openai_error(create({**good, "suffix": "../../etc"}), 400, param="suffix")
    assert_openai_error(create({**good, "metadata": ["a"]}), 400, param="metadata")
    assert_openai_error(create({**good, "hyperparameters": {"n_epochs": "many"}}), 400, param="hyperparameters.n_epochs")
    assert_openai_error(create({**good, "hyperparameters": {"learning_rate_multiplier": -1}}), 400,
                        param="hyperparameters.learning_rate_multiplier")
    assert_openai_error(create({**good, "hyperparameters": {"warmup": 3}}), 400, param="hyperparameters.warmup")
    assert_openai_error(create({**good, "method": {"type": "reinforcement"}}), 400, param="method.type")
    dpo = assert_openai_error(create({**good, "method": {"type": "dpo"}}), 400)  # a supervised file: no pairs
    assert "preference pairs" in dpo["message"]
    assert_openai_error(create({**good, "lora_r": "big"}), 400, param="lora_r")
    assert_openai_error(create({**good, "lora": {"r": -1}}), 400, param="lora.r")
    assert_openai_error(create({**good, "lora": {"rank": 8}}), 400, param="lora.rank")
    assert_openai_error(create({**good, "wandb": True}), 400, param="wandb")
    # unknown models, and paths wherever a request could put one
    assert_openai_error(create({**good, "model": "gpt-4o-mini"}), 404, param="model")
    assert_openai_error(create({**good, "model": str(Path.cwd())}), 404, param="model")
    assert_openai_error(create({**good, "model": "../models/tiny"}), 404, param="model")
    assert_openai_error(create({**good, "training_file": "/etc/passwd"}), 404, param="training_file")
    assert_openai_error(create({**good, "validation_file": "../../api.db"}), 404, param="validation_file")
    assert_openai_error(create({**good, "base_model": "/tmp"}), 400, param="base_model")
    assert_openai_error(create({**good, "validation": {"dataset": "/etc/passwd"}}), 400, param="validation.dataset")
    # a judge would post the answers, and a key of the server's environment, to the caller's URL
    judged = assert_openai_error(create({**good, "validation": {"judge": {
        "endpoint": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "HOME"}}}), 400, param="validation.judge")
    assert "operator sets judges in queue files" in judged["message"]
    assert_openai_error(create({**good, "chat_template": "/etc/passwd"}), 400, param="chat_template")
    assert_openai_error(create({**good, "init_from": "/etc"}), 400, param="init_from")
    assert_openai_error(service.raw("GET", "/files/..%2F..%2Fapi.db/content"), 404)
    assert_openai_error(service.raw("GET", "/models/..%2F..%2Fetc"), 404)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("/etc/passwd")
    # another tenant's ids answer as if they did not exist
    assert_openai_error(service.raw("POST", "/fine_tuning/jobs", key="bob", json=good), 404, param="training_file")
    assert_openai_error(service.raw("GET", f"/files/{training.id}", key="bob"), 404)
    assert_openai_error(service.raw("GET", "/fine_tuning/jobs/ftjob-nope"), 404)
    # query parameters, routes, methods
    assert_openai_error(service.raw("GET", "/fine_tuning/jobs?limit=0"), 400, param="limit")
    assert_openai_error(service.raw("GET", "/fine_tuning/jobs?limit=ten"), 400, param="limit")
    assert_openai_error(service.raw("GET", "/fine_tuning/jobs?metadata=x"), 400, param="metadata")
    assert_openai_error(service.raw("GET", "/no/such/thing"), 404)
    assert_openai_error(service.raw("DELETE", "/fine_tuning/jobs"), 405)
    assert_openai_error(service.raw("POST", "/fine_tuning/jobs/ftjob-nope/explode"), 404)
    # uploads: not multipart, no file, too large (refused from its Content-Length, before it is read)
    assert_openai_error(service.raw("POST", "/files", content=b"abc", headers={"content-type": "text/plain"}), 400)
    assert_openai_error(service.raw("POST", "/files", data={"purpose": "fine-tune"},
                                    files={"other": ("x.jsonl", b"{}")}), 400, param="file")
    assert_openai_error(service.raw("POST", "/files", files={"file": ("big.jsonl", b"x" * (MAX_UPLOAD + 1))},
                                    data={"purpose": "fine-tune"}), 413)
    # completions
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def complete(body: Any) -> httpx.Response:
        return service.raw("POST", "/chat/completions", json=body)

    assert_openai_error(complete({**chat, "model": "nope"}), 404, param="model")
    assert_openai_error(complete({**chat, "model": "ft:tiny::ftjob-nope"}), 404, param="model")
    assert_openai_error(complete({**chat, "model": "/etc/passwd"}), 404, param="model")
    assert_openai_error(complete({**chat, "messages": "hi"}), 400, param="messages")
    assert_openai_error(complete({**chat, "messages": [{"role": "robot", "content": "x"}]}), 400)
    assert_openai_error(complete({**chat, "max_tokens": -1}), 400, param="max_tokens")
    assert_openai_error(complete({**chat, "max_tokens": 10**9}), 400, param="max_tokens")
    assert_openai_error(complete({**chat, "temperature": "hot"}), 400, param="temperature")
    assert_openai_error(complete({**chat, "stop": [1]}), 400, param="stop")
    assert_openai_error(complete({**chat, "n": 3}), 400, param="n")
    assert_openai_error(complete({**chat, "tools": []}), 400, param="tools")
    assert_openai_error(service.raw("POST", "/completions", json={"model": "tiny", "prompt": 5}), 400, param="prompt")


# ---------------------------------------------------------------- the real tier


@pytest.mark.real
@pytest.mark.slow
def test_a_job_through_the_api_beats_its_base_on_held_out_prompts(real_model: Any,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """The queue-file path's number-words task (tests/realdata.py), as a user of the OpenAI API would run it."""
    from transformers import AutoTokenizer

    import realdata
    from loraq.workspace import Home

    fmt, lr, batch = realdata.REAL_JOBS["digits"]
    task = realdata.make(fmt, n_train=64, n_eval=16)
    root = tmp_path_factory.mktemp("api-real")
    train, held_out = task.write(root / "data")
    home = root / "home"
    home.mkdir()
    (home / "config.yaml").write_text(f"models:\n  smol: {real_model.folder}\n", encoding="utf-8")
    key = loraq(home, "keys", "create", "real").stdout.strip()
    server, link = start_cli_server(Home(home), loraq=LORAQ)
    worker = subprocess.Popen([LORAQ, "--home", str(home), "run", "--wait", "--devices", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=link.partition("/?token=")[0] + "/v1", api_key=key, max_retries=0, timeout=600)
        training, validation = upload(client, train), upload(client, held_out)
        job = client.fine_tuning.jobs.create(
            model="smol", training_file=training.id, validation_file=validation.id, suffix="digits", seed=42,
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "batch_size": batch, "learning_rate_multiplier": lr / 2.0e-4, "n_epochs": "auto"}}},
            extra_body={"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
                        "max_steps": 4, "training": {"max_seq_len": 64, "logging_steps": 1, "save_steps": 4}})
        done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"), limit_s=1500)
        assert done.status == "succeeded", done.error
        tokenizer = AutoTokenizer.from_pretrained(real_model.folder)
        budget = 3 + max(len(tokenizer(realdata.answer(r, fmt), add_special_tokens=False).input_ids) for r in task.eval)

        def score(model: str) -> float:
            right = 0
            for row in task.eval:
                got = client.completions.create(model=model, prompt=row["prompt"], max_tokens=budget, temperature=0)
                right += got.choices[0].text.strip() == realdata.answer(row, fmt)
            return right / len(task.eval)

        base, tuned = score("smol"), score(done.fine_tuned_model)
        assert tuned >= base + 0.25, (base, tuned)
    finally:
        stop(worker)
        stop(server)
