"""Helpers for the dashboard tests: real store rows (no mocks), and the parts of a page that matter."""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from loraq.queue.store import NewJob, Store, WorkerId
from loraq.workspace import Home

WORKER = WorkerId("testhost", 4242, "t0")
SCRIPT_NAME = "<script>alert(1)</script>"
HTML_PATH = "data/<img src=x onerror=alert(2)>.jsonl"
HTML_ERROR = "<b onmouseover=alert(3)>row 3</b>: no 'text' key"


def spec(name: str, *, group: str | None = None, dataset: str = "data/support.jsonl") -> dict[str, Any]:
    inner: dict[str, Any] = {"lora": {"r": 4, "alpha": 8}, "training": {"max_steps": 6}}
    if group is not None:
        inner["group"] = group
    return {"name": name, "base_model": "./models/tiny", "dataset_path": dataset, "dataset_rows": 120, "spec": inner}


def enqueue(store: Store, name: str, **kwargs: Any) -> int:
    priority = kwargs.pop("priority", 0)
    return store.enqueue([NewJob(name=name, spec=spec(name, **kwargs), base_key="tiny", priority=priority)])[0]


def run_to_completion(store: Store, *, result: dict[str, Any] | None = None, steps: int = 4) -> int:
    """Claim the next job and complete it as a worker would: progress, metrics, result."""
    claim = store.claim(WORKER, lease_s=60)
    assert claim is not None
    for step in range(1, steps + 1):
        metrics = {"loss": 3.0 - 0.4 * step}
        if step == 1:
            metrics["base_eval_loss"] = 3.1
        if step % 2 == 0:
            metrics["eval_loss"] = 3.0 - 0.3 * step
        store.record_progress(claim.job.id, claim.epoch, claim.attempt, step=step, total=steps, metrics=metrics)
    store.complete(claim.job.id, claim.epoch, result={"train_loss": 1.4, "eval_loss": 1.8, "base_eval_loss": 3.1,
                                                      **(result or {})})
    return claim.job.id


def fail_next(store: Store, reason: str = HTML_ERROR) -> int:
    claim = store.claim(WORKER, lease_s=60)
    assert claim is not None
    store.fail(claim.job.id, claim.epoch, kind="data", reason=reason, retryable=False)
    return claim.job.id


def new_home(root: Path) -> Home:
    home = Home(root / "home")
    home.ensure()
    return home


@dataclass
class Tag:
    name: str
    attrs: dict[str, str | None]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[Tag] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(Tag(tag, dict(attrs)))


def tags(html: str) -> list[Tag]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


def assert_no_injected_markup(html: str) -> None:
    """What a browser would run or fetch from this page: only our own script, no handlers, no images."""
    for tag in tags(html):
        assert tag.name not in ("img", "iframe", "object", "embed", "style", "base"), tag
        assert not [a for a in tag.attrs if a.startswith("on")], tag
        assert "style" not in tag.attrs, tag  # the CSP allows no inline style either
        if tag.name == "script":
            assert tag.attrs.get("src") == "/static/app.js", tag
        for attr in ("href", "src", "action"):
            value = tag.attrs.get(attr)
            assert value is None or value.startswith(("/", "?", "#")) or value == "", tag


def start_cli_server(home: Home, *extra: str, loraq: str) -> tuple[subprocess.Popen[str], str]:
    """``loraq serve --port 0`` in a subprocess; returns it and the link (with the token) it printed."""
    proc = subprocess.Popen([loraq, "--home", str(home.root), "serve", "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"open (http://\S+)", line)
        if found:
            return proc, found.group(1)
    proc.wait(timeout=30)
    raise AssertionError(f"loraq serve printed no link (exit {proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
