"""The OpenAI-compatible API (issue 22): its overhead per job, its job listing at 10,000 jobs, its generation speed.

    .venv/bin/python benchmarks/bench_api.py [--steps 40] [--repeat 3] [--jobs 10000] [--tokens 96]
        [--only jobs|listing|generation ...] [--base tiny|real]

- **Overhead per job**: the same job (the demo's tiny model, the support dataset,
  LoRA r=8, batch 8, ``--steps`` steps) run end to end on one home with a ``loraq serve``
  process and one ``loraq run --wait`` worker (its trainer warm for both): (a) from a
  queue file, ``loraq submit``, then the store read every 0.2 s until the job is
  completed; (b) through the API with the official ``openai`` client: upload, create,
  ``retrieve`` every 0.2 s until ``succeeded``. Wall time of each, alternating,
  ``--repeat`` times; the API path's over the queue file's. Goal: within 5%.
- **GET /v1/fine_tuning/jobs at ``--jobs`` jobs**, server side: the /v1 app answering
  in-process (Starlette's TestClient: auth, the page's query in api.db, each job read
  from the queue's store, JSON), for the first page, a page deep in the list (``after``),
  and a metadata filter. Goal: under 50 ms.
- **Chat-completions tokens per second** against a plain ``generate()`` loop on the same
  adapter: ``--tokens`` greedy tokens, through ``client.chat.completions.create`` (the
  whole HTTP round trip, streamed and not) and through ``PeftModel.generate`` in a
  process of its own (started as the server is, its model loaded once) on the same prompt,
  in rounds of plain, whole, streamed back to back, so that each round's ratios are taken
  under the same load (the machine is shared); the ratio is the median of the rounds'.
  Beside it, the CPU milliseconds a token of the plain process and of the server process
  (its generation thread and its event loop): what a stream costs over a whole answer,
  whatever the load. The tiny model would end its answer after a few tokens:
  its ``generation_config.json`` names a token it never produces as the end, so both
  paths generate exactly ``--tokens``. Goal: at least 0.9x.

``--only generation`` (repeatable, with ``jobs`` and ``listing``) runs only that part;
generation alone uses the 2-step warm-up job's adapter.

``--base real`` measures generation on the project's real pretrained base,
SmolLM2-135M-Instruct (built once per machine by ``tools/real_model.py`` into
``$LORAQ_CACHE``), with an adapter the benchmark trains on it through the API first
(:data:`REAL_JOB`: a minute or so on a CPU). Its folder is linked file by file into a
temporary one whose own ``generation_config.json`` names the never-produced end (the
cache is never written). The job-overhead part stays on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import BENCH_DIR, LORAQ, PYTHON, load, machine, median, quiet_env, quiet_hf, run, table

from loraq import api, demo
from loraq.queue.store import NewJob, Store
from loraq.service.state import ApiState
from loraq.workspace import Home

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
#: The adapter trained on the real base before its generation is measured: small, for a CPU.
REAL_JOB = {"steps": 16, "max_seq_len": 64}


def training(steps: int) -> dict[str, Any]:
    return {"max_steps": steps, "batch_size": 8, "learning_rate": 2.0e-4, "max_seq_len": 128, "save_steps": 20,
            "logging_steps": 5, "seed": 3}


def phases(server: Server, name: str) -> tuple[float, float]:
    """``(claimed -> finished, seconds)`` of a finished job, from the store: the worker's share."""
    with api.open_reader(Home(server.home)) as store:
        job = store.job(name)
    assert job.started_at is not None and job.finished_at is not None
    return job.finished_at - job.started_at, job.started_at - job.created_at


def queue_file_job(server: Server, model: Path, data: Path, steps: int, n: int) -> tuple[float, float, str]:
    """``loraq submit`` of a one-job queue file into the server's home; its warm worker trains it."""
    queue = server.home.parent / f"queue-{n}.yaml"
    name = f"support-{n}"
    queue.write_text(json.dumps({"jobs": [{"name": name, "base_model": str(model), "dataset": str(data),
                                           "lora": LORA, "training": training(steps)}]}), encoding="utf-8")
    home = Home(server.home)
    t0 = time.perf_counter()
    run([LORAQ, "--home", str(server.home), "--allow-root", str(model.parent), "submit", str(queue)], env=quiet_env())
    enqueued = time.perf_counter() - t0
    while True:
        with api.open_reader(home) as store:
            status = store.job(name).status
        if status in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    if status != "completed":
        raise SystemExit(f"the queue-file job ended {status}")
    return time.perf_counter() - t0, enqueued, name


class Server:
    """``loraq serve`` and ``loraq run --wait`` on one home, for the API's side."""

    def __init__(self, home: Path, model: Path, name: str = "tiny") -> None:
        home.mkdir(parents=True)
        # the real base's files are links into the cache (real_base), which the trainer must be allowed to read
        linked_to = (model / "config.json").resolve().parent
        (home / "config.yaml").write_text(f"models:\n  {name}: {model}\nallow_roots: [{linked_to}]\n",
                                          encoding="utf-8")
        self.home = home
        self.model_name = name
        self.key = run([LORAQ, "--home", str(home), "keys", "create", "bench"], env=quiet_env()).stdout.strip()
        self.serve = subprocess.Popen([LORAQ, "--home", str(home), "serve", "--port", "0"], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, env=quiet_env())
        assert self.serve.stdout is not None
        for line in self.serve.stdout:
            found = re.search(r"open (http://\S+)/\?token=", line)
            if found:
                self.base_url = found.group(1) + "/v1"
                break
        self.worker = subprocess.Popen([LORAQ, "--home", str(home), "run", "--wait", "--devices", "cpu"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=quiet_env())

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.key, max_retries=0, timeout=600)

    def stop(self) -> None:
        for proc in (self.worker, self.serve):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def api_job(server: Server, data: Path, steps: int, max_seq_len: int = 128) -> tuple[float, float, str]:
    client = server.client()
    t0 = time.perf_counter()
    with open(data, "rb") as fh:
        uploaded = client.files.create(file=fh, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=server.model_name, training_file=uploaded.id, seed=3,
        hyperparameters={"batch_size": 8, "learning_rate_multiplier": 1.0},
        extra_body={"lora_r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
                    "target_modules": LORA["target_modules"], "max_steps": steps,
                    "training": {"max_seq_len": max_seq_len, "save_steps": 20, "logging_steps": 5}})
    enqueued = time.perf_counter() - t0
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    if job.status != "succeeded":
        raise SystemExit(f"the API job ended {job.status}: {job.error}")
    return time.perf_counter() - t0, enqueued, job.fine_tuned_model


# ---------------------------------------------------------------- listing at 10,000 jobs


def fill(home: Home, n: int) -> None:
    home.ensure()
    with Store.open(home.db_path) as store:
        ids = store.enqueue([NewJob(name=f"ftjob-{i:024x}", base_key="b", spec={
            "name": f"ftjob-{i:024x}", "base_model": "/m", "dataset_path": f"/d/{i}.jsonl",
            "spec": {"lora": {"r": 8}, "training": {"epochs": 3.0, "batch_size": 8, "learning_rate": 2e-4}}})
            for i in range(n)])
    state = ApiState.of_home(home.root)
    now = time.time()
    with state.transaction() as conn:
        conn.execute("INSERT INTO keys (name, hash, created_at) VALUES ('bench', 'h', ?)", (now,))
        conn.executemany(
            "INSERT INTO jobs (id, job_id, key_id, model, suffix, metadata, training_file, seed, request, created_at) "
            "VALUES (?, ?, 1, 'tiny', NULL, ?, 'file-x', 3, '{\"method\": \"supervised\"}', ?)",
            [(f"ftjob-{i:024x}", job_id, json.dumps({"team": f"t{i % 50}"}), now) for i, job_id in enumerate(ids)])
    state.close()


def listing(n: int, repeat: int) -> list[tuple[str, float]]:
    from starlette.testclient import TestClient

    from loraq.service.app import create_service

    work = Path(tempfile.mkdtemp(prefix="bench-api-list-"))
    try:
        home = Home(work / "home")
        fill(home, n)
        client = TestClient(create_service(home, "operator-token"))
        headers = {"authorization": "Bearer operator-token"}
        deep = f"ftjob-{n // 2:024x}"
        cases = [("first page (20)", "/v1/fine_tuning/jobs"),
                 ("first page (100)", "/v1/fine_tuning/jobs?limit=100"),
                 (f"after the {n // 2:,}th", f"/v1/fine_tuning/jobs?after={deep}"),
                 ("metadata[team]=t7", "/v1/fine_tuning/jobs?metadata[team]=t7")]
        out = []
        for label, url in cases:
            def once(url: str = url) -> None:
                response = client.get(url, headers=headers)
                assert response.status_code == 200 and response.json()["data"], response.text

            once()
            samples = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                once()
                samples.append(time.perf_counter() - t0)
            out.append((label, median(samples)))
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- tokens per second


def plain_generate(model_dir: str, adapter: str, tokens: int) -> None:
    """A plain ``PeftModel.generate()`` loop: one greedy answer per line read on stdin, ``[seconds, tokens]`` out."""
    import sys

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(adapter)).eval()
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    print("ready", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        print(json.dumps([time.perf_counter() - t0, int(out.shape[1] - ids.shape[1])]), flush=True)


def never_eos(model: Path) -> None:
    """Generation ends only at ``max_tokens``: the end-of-sequence is a token the model never produces."""
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": config["vocab_size"] - 1,
                                                              "pad_token_id": 0}), encoding="utf-8")


def real_base(work: Path) -> Path:
    """SmolLM2-135M-Instruct's cached folder, linked file by file into ``work`` so that :func:`never_eos` can
    write its own ``generation_config.json`` there without touching the cache."""
    tools = str(BENCH_DIR.parent / "tools")
    sys.path.insert(0, tools)
    try:
        import real_model
    finally:
        sys.path.remove(tools)
    try:
        cached = real_model.ensure().folder
    except real_model.RealModelUnavailable as exc:
        raise SystemExit(f"--base real: the real model is unavailable: {exc}") from None
    folder = work / "smollm2"
    folder.mkdir()
    for path in cached.iterdir():
        if path.name != "generation_config.json":
            (folder / path.name).symlink_to(path)
    return folder


PROMPT = [{"role": "user", "content": "Hello, I need help with a refund for my last order."}]


def api_generate(server: Server, model: str, tokens: int, stream: bool) -> tuple[float, int]:
    """One greedy answer through ``client.chat.completions.create``: ``(seconds, tokens)``."""
    client = server.client()
    t0 = time.perf_counter()
    if stream:
        usage = None
        for chunk in client.chat.completions.create(model=model, messages=PROMPT, max_tokens=tokens, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            usage = chunk.usage or usage
        assert usage is not None
        produced = usage.completion_tokens
    else:
        produced = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=tokens,
                                                  temperature=0).usage.completion_tokens
    return time.perf_counter() - t0, produced


def generation(server: Server, model: Path, fine_tuned: str, tokens: int, repeat: int, base: str) -> None:
    """Rounds of plain, whole, streamed, back to back (each round's ratios under the same load), after a warm-up."""
    never_eos(model)
    # in a process of its own, started as the server was: neither side shares its cores with the other
    adapter = server.home / "adapters" / fine_tuned.rsplit(":", 1)[-1]
    code = f"import bench_api; bench_api.plain_generate({str(model)!r}, {str(adapter)!r}, {tokens})"
    plain = subprocess.Popen([PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=quiet_env(), cwd=BENCH_DIR)
    assert plain.stdin is not None and plain.stdout is not None
    try:
        assert plain.stdout.readline().strip() == "ready"

        def plain_once() -> tuple[float, int]:
            plain.stdin.write("go\n")  # type: ignore[union-attr]
            plain.stdin.flush()  # type: ignore[union-attr]
            seconds, produced = json.loads(plain.stdout.readline())  # type: ignore[union-attr]
            return float(seconds), int(produced)

        import psutil

        def cpu_s(pid: int) -> float:
            times = psutil.Process(pid).cpu_times()
            return float(times.user + times.system)

        def timed(fn: Any, pid: int) -> tuple[float, int, float]:
            cpu0 = cpu_s(pid)
            seconds, produced = fn()
            return seconds, produced, cpu_s(pid) - cpu0

        rows, ratios, cpu = [], {"whole": [], "stream": []}, {"plain": [], "whole": [], "stream": []}
        produced: set[tuple[int, int, int]] = set()
        for n in range(repeat + 1):
            p_s, p_n, p_cpu = timed(plain_once, plain.pid)
            w_s, w_n, w_cpu = timed(lambda: api_generate(server, fine_tuned, tokens, stream=False), server.serve.pid)
            s_s, s_n, s_cpu = timed(lambda: api_generate(server, fine_tuned, tokens, stream=True), server.serve.pid)
            if n == 0:
                continue  # the warm-up: the server loads the base and the adapter
            assert p_n == w_n == s_n == tokens, (p_n, w_n, s_n)
            produced.add((p_n, w_n, s_n))
            ratios["whole"].append(p_s / w_s)
            ratios["stream"].append(p_s / s_s)
            for key, value in (("plain", p_cpu), ("whole", w_cpu), ("stream", s_cpu)):
                cpu[key].append(value * 1000 / tokens)
            rows.append([n, f"{p_s:.3f}", f"{w_s:.3f}", f"{s_s:.3f}", f"{p_s / w_s:.2f}", f"{p_s / s_s:.2f}",
                         f"{p_cpu * 1000 / tokens:.2f} | {w_cpu * 1000 / tokens:.2f} | {s_cpu * 1000 / tokens:.2f}"])
    finally:
        plain.stdin.close()  # type: ignore[union-attr]
        plain.wait(timeout=60)
    print(f"\n3. greedy generation of {tokens} tokens on the same adapter of {base}, rounds back to back ({load()})")
    print(table(["round", "plain generate() s", "chat.completions whole s", "chat.completions stream=True s",
                 "whole vs plain (tokens/s)", "stream vs plain (tokens/s)",
                 "CPU ms a token: plain | server whole | server stream"], rows))
    print(f"median of {repeat}: whole {median(ratios['whole']):.2f}x, stream=True {median(ratios['stream']):.2f}x "
          f"the tokens/s of plain generate() (goal >= 0.9x); CPU ms a token: plain {median(cpu['plain']):.2f}, "
          f"server whole {median(cpu['whole']):.2f}, server stream {median(cpu['stream']):.2f}; tokens produced "
          f"(plain, whole, stream) in every round: {', '.join(str(p) for p in sorted(produced))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--only", choices=("jobs", "listing", "generation"), action="append",
                        help="run only this part (repeatable); generation alone uses the warm-up job's adapter")
    parser.add_argument("--base", choices=("tiny", "real"), default="tiny",
                        help="generation on the demo's tiny model or on the real SmolLM2-135M-Instruct "
                             "(an adapter trained on it first, through the API)")
    args = parser.parse_args()
    parts_run = set(args.only or ("jobs", "listing", "generation"))
    if args.base == "real" and "jobs" in parts_run:
        parser.error("--base real measures generation only: add --only generation")
    quiet_hf()
    print(f"bench_api: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    try:
        if args.base == "real":
            model, base = real_base(work), "SmolLM2-135M-Instruct"
        else:
            model, base = demo.build_model(work / "tiny", pretrain_steps=20), "the tiny model"
        name, make = demo.DATASETS["support"]
        data = demo.write_jsonl(work / name, make(120, random.Random(1)))

        server = (Server(work / "api-home", model, "smollm2" if args.base == "real" else "tiny")
                  if parts_run & {"jobs", "generation"} else None)
        try:
            rows, queue_s, api_s = [], [], []
            parts: list[list[str]] = []
            if server is not None and args.base == "real":
                took, _, fine_tuned = api_job(server, data, REAL_JOB["steps"], REAL_JOB["max_seq_len"])
                print(f"\nthe adapter: {REAL_JOB['steps']} steps on {base} through the API (max_seq_len "
                      f"{REAL_JOB['max_seq_len']}, batch 8, LoRA r=8 on q/v), {took:.0f} s end to end")
            elif server is not None:
                # the worker's trainer starts and loads the base: neither path pays it
                _, _, fine_tuned = api_job(server, data, 2)
            for n in range(args.repeat if "jobs" in parts_run else 0):
                took, enqueued, name = queue_file_job(server, model, data, args.steps, n)
                queue_s.append(took)
                parts.append([f"{n + 1} queue file", f"{took:.2f}", f"{enqueued:.2f}",
                              *(f"{v:.2f}" for v in phases(server, name))])
                took, enqueued, fine_tuned = api_job(server, data, args.steps)
                api_s.append(took)
                parts.append([f"{n + 1} API", f"{took:.2f}", f"{enqueued:.2f}",
                              *(f"{v:.2f}" for v in phases(server, fine_tuned.rsplit(":", 1)[-1]))])
                rows.append([n + 1, f"{queue_s[-1]:.2f}", f"{api_s[-1]:.2f}", f"{api_s[-1] / queue_s[-1]:.3f}"])
            if rows:
                print(f"\n1. the same job ({args.steps} steps), end to end on a warm worker, wall seconds ({load()})")
                print(table(["run", "queue file: submit + poll", "API: upload + create + poll", "API / queue file"],
                            rows))
                print(table(["run, path", "end to end", "until enqueued (submit | upload + create)",
                             "claimed -> finished (the worker)", "enqueued -> claimed"], parts))
                print(f"median: queue file {median(queue_s):.2f} s, API {median(api_s):.2f} s, "
                      f"ratio {median(api_s) / median(queue_s):.3f} (goal <= 1.05)")
            if server is not None and "generation" in parts_run:
                generation(server, model, fine_tuned, args.tokens, args.repeat, base)
        finally:
            if server is not None:
                server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "listing" not in parts_run:
        return

    print(f"\n2. GET /v1/fine_tuning/jobs at {args.jobs:,} jobs, server side (in-process), median of 15 ({load()})")
    print(table(["request", "ms"], [[label, f"{seconds * 1000:.1f}"] for label, seconds in listing(args.jobs, 15)]))
    print("goal: < 50 ms")


if __name__ == "__main__":
    main()
