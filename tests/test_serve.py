"""loraq serve: the pages, the security rules (one test each), the data it renders, its live feed.

Every job here is a real store row, written as submit and a worker write them.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="loraq serve needs the serve extra: pip install 'loraq[serve]'")

from starlette.testclient import TestClient

from conftest import LORAQ
from dashboard import (
    HTML_PATH,
    SCRIPT_NAME,
    WORKER,
    assert_no_injected_markup,
    enqueue,
    fail_next,
    new_home,
    run_to_completion,
    start_cli_server,
    stop,
    tags,
)
from loraq import api
from loraq.errors import UsageError
from loraq.queue.store import Store
from loraq.serve import Settings, check_host, create_app
from loraq.serve.feed import Feed
from loraq.serve.render import STATIC, TEMPLATES
from loraq.workspace import Home

TOKEN = "test-token-0123456789"
BASE = "http://127.0.0.1:8765"
SAME_ORIGIN = {"origin": BASE}


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """Four jobs: a completed one named like a script (with metrics and generations), a failed one with
    HTML in its dataset path and error, a pending one in a sweep, a pending one."""
    home = new_home(tmp_path)
    with Store.open(home.db_path) as store:
        enqueue(store, SCRIPT_NAME, priority=9)
        enqueue(store, "bad-data", dataset=HTML_PATH, priority=8)
        enqueue(store, "sweep-a", group="lr-sweep")
        enqueue(store, "plain")
        run_to_completion(store, result={
            "metrics": {"exact_match": {"base": 0.0, "adapter": 0.9}, "<svg onload=alert(4)>": {"base": 1, "adapter": 2}},
            "generations": [{"prompt": "<b>What is 2+2?</b>", "reference": "4", "base": "<img src=x onerror=alert(5)>",
                             "adapter": "4"}],
            "inspection": {"passed": True, "findings": [{"severity": "warning", "code": "x<y>",
                                                        "message": "<script>alert(6)</script>"}]},
        })
        fail_next(store)
    log = home.attempt_dir(1, 1) / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("step 1 loss 2.6\n<script>alert(7)</script> in a log line\n", encoding="utf-8")
    return home


def make_client(home: Home, **settings: object) -> TestClient:
    app = create_app(Settings(home=home, token=TOKEN, poll_s=0.05, **settings))  # type: ignore[arg-type]
    return TestClient(app, base_url=BASE, follow_redirects=False)


@pytest.fixture
def client(home: Home) -> Iterator[TestClient]:
    with make_client(home) as c:
        assert c.get(f"/?token={TOKEN}").status_code == 303
        yield c


def job_status(home: Home, name: str) -> str:
    return next(j.status for j in api.status(home).jobs if j.name == name)


def job_rows(html: str) -> list[str]:
    return [t.attrs["data-id"] or "" for t in tags(html) if t.name == "tr" and "data-id" in t.attrs]


# ---------------------------------------------------------------- binding


def test_binds_loopback_by_default_and_prints_a_link_with_its_token(home: Home) -> None:
    proc, link = start_cli_server(home, loraq=LORAQ)
    stream = None
    try:
        assert link.startswith("http://127.0.0.1:") and "?token=" in link
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(link, timeout=30) as response:  # follows the redirect that sets the cookie
            assert response.status == 200
        stream = opener.open(link.split("?")[0] + "stream", timeout=30)  # a page left open
        assert stream.readline() == b"retry: 2000\n"
    finally:
        assert stop(proc) == 0  # Ctrl-C is a normal end, open pages or not
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
        if stream is not None:
            stream.close()


def test_a_non_loopback_host_needs_allow_remote(home: Home) -> None:
    assert check_host("127.0.0.1", False) is None and check_host("::1", False) is None
    assert check_host("localhost", False) is None
    for host in ("0.0.0.0", "192.168.1.20", "example.org"):
        with pytest.raises(UsageError, match="--allow-remote"):
            check_host(host, False)
    import subprocess

    refused = subprocess.run([LORAQ, "--home", str(home.root), "serve", "--host", "0.0.0.0", "--port", "0"],
                             check=False, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr and "open http" not in refused.stdout

    proc, link = start_cli_server(home, "--host", "0.0.0.0", "--allow-remote", loraq=LORAQ)
    try:
        assert link.startswith("http://0.0.0.0:")
    finally:
        assert stop(proc) == 0
        assert proc.stderr is not None and "warning" in proc.stderr.read()


# ---------------------------------------------------------------- the token


def test_every_page_needs_the_token(home: Home) -> None:
    with make_client(home) as c:
        for path in ("/", "/jobs/1", "/jobs/1/log", "/report", "/stream", "/jobs/1/stream", "/reports/report.md"):
            r = c.get(path)
            assert r.status_code == 403, path
            assert "bad-data" not in r.text and "lr-sweep" not in r.text
        assert c.get("/", cookies={"loraq-token": "wrong"}).status_code == 403
        assert c.get("/?token=wrong").status_code == 403
        r = c.get(f"/jobs/1?token={TOKEN}")
        assert r.status_code == 303 and r.headers["location"] == "/jobs/1"  # the token leaves the address bar
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert c.get("/jobs/1").status_code == 200


def test_actions_are_posts_with_the_token_from_the_same_origin(client: TestClient, home: Home) -> None:
    def cancel(**kwargs: object) -> int:
        return client.post("/jobs/4/cancel", **kwargs).status_code  # type: ignore[arg-type]

    assert client.get("/jobs/4/cancel").status_code in (404, 405)
    assert cancel(data={"next": "/"}, headers=SAME_ORIGIN) == 403  # the cookie alone is not enough
    assert cancel(data={"token": "wrong"}, headers=SAME_ORIGIN) == 403
    assert cancel(data={"token": TOKEN}, headers={"origin": "http://evil.example"}) == 403
    assert cancel(data={"token": TOKEN}, headers={"sec-fetch-site": "cross-site"}) == 403
    assert cancel(data={"token": TOKEN}, headers={"referer": "http://evil.example/page"}) == 403
    assert client.post("/jobs/4/delete", data={"token": TOKEN}, headers=SAME_ORIGIN).status_code == 404
    assert job_status(home, "plain") == "pending"

    r = client.post("/jobs/4/cancel", data={"token": TOKEN, "next": "//evil.example/"}, headers=SAME_ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/jobs/4"  # never a redirect off the dashboard
    assert job_status(home, "plain") == "cancelled"
    assert client.post("/jobs/4/retry", data={"token": TOKEN, "next": "/?status=pending"},
                       headers=SAME_ORIGIN).headers["location"] == "/?status=pending"
    assert job_status(home, "plain") == "pending"
    # Not allowed in its state: refused with the store's reason, nothing changes.
    r = client.post("/jobs/1/cancel", data={"token": TOKEN}, headers=SAME_ORIGIN)
    assert r.status_code == 409 and "completed" in r.text
    client.post("/queue/pause", data={"token": TOKEN}, headers=SAME_ORIGIN)
    assert api.status(home).queue.paused  # type: ignore[union-attr]
    assert "Queue paused" in client.get("/").text
    client.post("/queue/resume", headers={"x-loraq-token": TOKEN})  # a script, with the header and no Origin
    assert not api.status(home).queue.paused  # type: ignore[union-attr]


def test_other_host_names_are_refused_on_loopback(client: TestClient) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 is not this dashboard."""
    assert client.get("/", headers={"host": "evil.example:8765"}).status_code == 403
    assert client.get("/", headers={"host": "localhost:8765"}).status_code == 200


# ---------------------------------------------------------------- escaping


def test_names_paths_errors_logs_and_outputs_show_as_text(client: TestClient, home: Home) -> None:
    queue = client.get("/").text
    job = client.get("/jobs/1").text
    failed = client.get("/jobs/2").text
    report = client.get("/report").text
    for page in (queue, job, failed, report):
        assert_no_injected_markup(page)
        assert "<script>alert" not in page and "<img src=x" not in page and "<b onmouseover" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in queue and "&lt;script&gt;alert(1)&lt;/script&gt;" in job
    assert "&lt;img src=x onerror=alert(2)&gt;" in failed  # the dataset path
    assert "&lt;b onmouseover=alert(3)&gt;row 3&lt;/b&gt;" in queue and "&lt;b onmouseover" in failed  # the error
    assert "&lt;script&gt;alert(7)&lt;/script&gt; in a log line" in job
    assert "&lt;b&gt;What is 2+2?&lt;/b&gt;" in job and "&lt;svg onload=alert(4)&gt;" in job
    assert "&lt;script&gt;alert(6)&lt;/script&gt;" in job  # an inspection finding
    log = client.get("/jobs/1/log")
    assert log.headers["content-type"].startswith("text/plain") and "<script>alert(7)" in log.text


def test_live_fragments_are_escaped_too(home: Home) -> None:
    from loraq.serve.render import JobView, Renderer

    renderer = Renderer(TOKEN, home.root)
    with api.open_reader(home) as store:
        rows = store.changed_since(0)
    update = renderer.queue_update(99, rows, {}, {"<i>g</i>": {"pending": 1}}, None)
    for fragment in [row["html"] for row in update["rows"]] + list(update["sections"].values()):
        assert_no_injected_markup(fragment)
        assert "<script>alert" not in fragment and "<b onmouseover" not in fragment and "<i>g</i>" not in fragment
    for section in renderer.job_sections(JobView.of(api.show(home, "1"))).values():
        assert_no_injected_markup(section)
        assert "<script>alert" not in section and "<img src=x" not in section


# ---------------------------------------------------------------- files


def test_no_url_reads_a_file_outside_the_home(client: TestClient, home: Home, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42\n")
    (tmp_path / "inspection.json").write_text(json.dumps({"passed": True, "findings": [{"message": "TOP-SECRET-42"}]}))
    (home.reports_dir / "report.md").write_text("# a saved report\n")
    (home.reports_dir / "leak.md").symlink_to(secret)
    assert client.get("/reports/report.md").text == "# a saved report\n"
    for path in ("/reports/leak.md", "/reports/..%2Fsecret.txt", "/reports/%2e%2e%2f%2e%2e%2fsecret.txt",
                 "/reports/..%2Floraq.db", "/reports/loraq.db", "/reports/.hidden.md",
                 "/static/..%2F..%2Fapi.py", "/static/%2e%2e/%2e%2e/api.py", "/jobs/1/log?attempt=..%2F..",
                 "/jobs/..%2F..%2F/log", "/jobs/-1/log", "/report.css/../loraq.db"):
        r = client.get(path)
        assert r.status_code in (400, 404), path
        assert "TOP-SECRET" not in r.text and "SQLite format" not in r.text, path
    # A training log swapped for a symlink to a file outside the home is not followed.
    log = home.attempt_dir(1, 1) / "train.log"
    log.unlink()
    log.symlink_to(secret)
    for path in ("/jobs/1/log", "/jobs/1"):
        assert "TOP-SECRET" not in client.get(path).text, path
    # A job whose name leads out of adapters/ does not read the inspection.json it points at.
    with Store.open(home.db_path) as store:
        leaky = enqueue(store, f"../../../{tmp_path.name}")
    assert "TOP-SECRET" not in client.get(f"/jobs/{leaky}").text


def test_saved_html_reports_run_no_script(client: TestClient, home: Home) -> None:
    with api.open_store(home) as store:
        from loraq import report

        report.write(home, store, "html")
    r = client.get("/reports/report.html")
    assert r.status_code == 200 and "&lt;script&gt;alert(1)" in r.text
    csp = r.headers["content-security-policy"]
    assert "sandbox" in csp and "script-src" not in csp and "default-src 'none'" in csp


# ---------------------------------------------------------------- the policy


def test_a_content_security_policy_on_every_response_and_no_inline_script(client: TestClient) -> None:
    for path in ("/", "/jobs/1", "/jobs/99", "/report", "/static/app.js", "/static/app.css", "/report.css",
                 "/nowhere", "/jobs/1/log"):
        r = client.get(path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp, path
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        if r.headers["content-type"].startswith("text/html"):
            assert_no_injected_markup(r.text)
    r = client.post("/jobs/1/cancel")
    assert "content-security-policy" in r.headers


def test_nothing_is_fetched_from_elsewhere() -> None:
    """No CDN: templates, script and style sheets name no other host (an SVG namespace is a name, not a fetch)."""
    files = [*TEMPLATES.iterdir(), *STATIC.iterdir()]
    assert {p.name for p in files} >= {"base.html", "queue.html", "job.html", "app.js", "app.css"}
    for path in files:
        text = path.read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path
        assert "@import" not in text and "url(" not in text, path
    js = (STATIC / "app.js").read_text()
    assert "innerHTML = html" in js and "eval(" not in js and "new Function" not in js


# ---------------------------------------------------------------- what it shows


def test_result_metrics_and_generations_show_when_present_and_hide_when_absent(client: TestClient) -> None:
    done = client.get("/jobs/1").text
    assert "quality, base → adapter" in done and "exact_match" in done and "0.900" in done
    assert "sample generations" in done and "What is 2+2?" in done
    assert "inspection:" in done and 'data-points="6"' in done  # 4 train and 2 eval points
    pending = client.get("/jobs/4").text
    assert "quality, base" not in pending and "sample generations" not in pending and "inspection:" not in pending
    assert "no metrics yet" in pending


def test_metrics_and_samples_in_the_protocols_flat_shape_show_too(client: TestClient, home: Home) -> None:
    with Store.open(home.db_path) as store:
        run_to_completion(store, result={"metrics": {"exact_match": 0.75, "base_exact_match": 0.125, "base_bleu": 3.5},
                                         "extras": {"samples": [{"prompt": "2+2?", "reference": "4", "base": "5",
                                                                 "adapter": "four"}]}})
    page = client.get("/jobs/3").text
    rows = {r.split("</td>")[0]: r for r in page.split("<tr><td>") if "</td><td class=\"num\">" in r}
    assert '0.125</td><td class="num"><b>0.750' in rows["exact_match"] and "base_exact_match" not in rows
    assert '3.500</td><td class="num"><b>—' in rows["bleu"]  # a base value with no adapter value
    assert "sample generations" in page and "four" in page


def test_sweeps_are_grouped_on_the_queue_page(client: TestClient, home: Home) -> None:
    with Store.open(home.db_path) as store:
        for n in range(3):
            enqueue(store, f"lr-{n}", group="lr-sweep")
        enqueue(store, "r-16", group="<i>rank</i> sweep")
    queue = client.get("/").text
    assert "<h2>sweeps</h2>" in queue and "lr-sweep" in queue and "&lt;i&gt;rank&lt;/i&gt; sweep" in queue
    only = client.get("/?group=lr-sweep").text
    names = {t.attrs.get("href") for t in tags(only) if t.name == "a" and (t.attrs.get("href") or "").startswith("/jobs/")}
    assert names == {"/jobs/3", "/jobs/5", "/jobs/6", "/jobs/7"}
    with make_client(new_home(home.root.parent / "other")) as c:  # no sweeps: no sweeps table
        c.get(f"/?token={TOKEN}")
        assert "<h2>sweeps</h2>" not in c.get("/").text


def test_the_queue_page_is_paginated(tmp_path: Path) -> None:
    home = new_home(tmp_path)
    with Store.open(home.db_path) as store:
        from loraq.queue.store import NewJob

        store.enqueue([NewJob(name=f"job-{i}", spec={"spec": {}}, base_key="b") for i in range(250)])
    with make_client(home) as c:
        c.get(f"/?token={TOKEN}")
        first, third = c.get("/").text, c.get("/?page=3").text
        assert len(job_rows(first)) == 100 and job_rows(first)[0] == "1"
        assert job_rows(third) == [str(i) for i in range(201, 251)] and "jobs 201–250 of 250" in third
        assert "/?page=2" in first and "/?page=2" in third and "?page=4" not in third
        assert len(job_rows(c.get("/?status=pending&page=2").text)) == 100
        assert c.get("/?status=bogus").status_code == 404


def test_a_home_without_a_database_is_shown_empty_and_never_created(tmp_path: Path) -> None:
    home = Home(tmp_path / "fresh")
    with make_client(home) as c:
        c.get(f"/?token={TOKEN}")
        assert "No jobs in this home yet" in c.get("/").text
        assert c.get("/jobs/1").status_code == 404 and c.get("/report").status_code == 200
        assert c.post("/queue/pause", data={"token": TOKEN}, headers=SAME_ORIGIN).status_code == 404
    assert not home.db_path.exists() and not home.root.exists()


# ---------------------------------------------------------------- reading, and the feed


class Statements:
    """SQLite's own count of virtual-machine steps, and the statements run: work, not time."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.steps = 0
        self.sql: list[str] = []
        conn.set_progress_handler(self._step, 1)
        conn.set_trace_callback(self.sql.append)

    def _step(self) -> int:
        self.steps += 1
        return 0

    def reset(self) -> None:
        self.steps = 0
        self.sql.clear()


def _feed_on(tmp_path: Path, n_jobs: int) -> tuple[Home, Feed, Statements]:
    from loraq.queue.store import NewJob

    home = new_home(tmp_path / f"n{n_jobs}")
    with Store.open(home.db_path) as store:
        store.enqueue([NewJob(name=f"job-{i}", spec={"spec": {"group": f"g{i % 7}"}}, base_key="b")
                       for i in range(n_jobs)])
    feed = Feed(home)
    feed.poll()  # opens, counts every job once
    assert feed._store is not None
    return home, feed, Statements(feed._store.conn)


def test_a_live_update_costs_work_in_proportion_to_the_jobs_that_changed(tmp_path: Path) -> None:
    work = {}
    for n_jobs in (50, 5000):
        home, feed, counted = _feed_on(tmp_path, n_jobs)
        assert feed.counts["pending"] == n_jobs and feed.groups["g0"]["pending"] == -(-n_jobs // 7)
        assert feed.poll() is None and counted.sql == ["PRAGMA data_version"]  # nothing changed: one pragma
        with Store.open(home.db_path) as store:
            claim = store.claim(WORKER, lease_s=60)
            assert claim is not None
            store.heartbeat(claim.job.id, claim.epoch, lease_s=60)
            counted.reset()
            store.record_progress(claim.job.id, claim.epoch, claim.attempt, step=1, total=5, metrics={"loss": 2.0})
        change = feed.poll()
        assert change is not None and [row["name"] for row in change.rows] == ["job-0"]
        assert change.rows[0]["progress_step"] == 1 and change.counts["running"] == 1
        assert change.counts["pending"] == n_jobs - 1 and change.groups["g0"]["running"] == 1
        assert feed.poll() is None
        work[n_jobs] = counted.steps
        # A heartbeat alone changes nothing a page shows: no rows.
        with Store.open(home.db_path) as store:
            store.heartbeat(claim.job.id, claim.epoch, lease_s=60)
        assert feed.poll() is None
        feed.stop()
    # 100x the jobs, the same work for one changed job (SQLite VM steps; an index range on seq).
    assert work[5000] < work[50] * 1.5, work


def test_the_feed_follows_a_store_that_appears_later(tmp_path: Path) -> None:
    home = Home(tmp_path / "later")
    feed = Feed(home)
    assert feed.poll() is None and not home.db_path.exists()
    home.ensure()
    with Store.open(home.db_path) as store:
        enqueue(store, "first")
    assert feed.poll() is None and feed.counts["pending"] == 1  # opened: the totals count it
    with Store.open(home.db_path) as store:
        enqueue(store, "second")
    change = feed.poll()
    assert change is not None and [r["name"] for r in change.rows] == ["second"]
    feed.stop()


def test_the_queue_stream_catches_up_and_follows(client: TestClient, home: Home) -> None:
    with client.stream("GET", "/stream?since=0") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "content-security-policy" in r.headers
        events = _sse_events(r.iter_lines())
        kind, data = next(events)
        assert kind == "queue" and {row["id"] for row in data["rows"]} == {1, 2, 3, 4}
        assert all("<script>alert" not in row["html"] for row in data["rows"])
        with Store.open(home.db_path) as store:
            store.cancel("plain")
        kind, data = next(events)
        assert kind == "queue" and [(row["id"], row["status"]) for row in data["rows"]] == [(4, "cancelled")]
        assert "<b>1</b> cancelled" in data["sections"]["counts"]


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    kind, data = None, []
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and kind:
            yield kind, json.loads("".join(data))
            kind, data = None, []


def test_an_empty_database_file_is_reported_and_left_as_it_is(tmp_path: Path) -> None:
    home = new_home(tmp_path)
    home.db_path.write_bytes(b"")  # a disk that filled, a bad copy: damage, not a new home
    with make_client(home) as c:
        c.get(f"/?token={TOKEN}")
        r = c.get("/")
        assert r.status_code == 503 and "the file is empty (0 bytes)" in r.text
        assert c.get("/report").status_code == 503 and c.get("/jobs/1").status_code == 503
    assert home.db_path.read_bytes() == b""



def test_every_page_stream_runs_one_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step sees the opening, each change and each quiet wait; keep-alive after KEEPALIVE_S of silence; the
    stream ends when the step or the feed says so, and always unsubscribes."""
    import asyncio

    from loraq.serve import app as app_module
    from loraq.serve.feed import Change

    monkeypatch.setattr(app_module, "KEEPALIVE_S", 0.025)

    class OneFeed:
        unsubscribed = 0

        def unsubscribe(self, queue: object) -> None:
            self.unsubscribed += 1

    async def run(script: list[object], answers: dict[str, tuple[list[str], bool]]) -> tuple[list[str], list[str]]:
        subscription: asyncio.Queue[Change | None] = asyncio.Queue()
        seen: list[str] = []

        async def step(news: object) -> tuple[list[str], bool]:
            kind = ("open" if news is None else "change" if isinstance(news, Change) else "quiet")
            seen.append(kind)
            if kind == "quiet" and seen.count("quiet") == 4:
                return answers.get("fourth quiet", ([], True))
            if kind == "quiet" and script:
                item = script.pop(0)
                await subscription.put(item)  # type: ignore[arg-type]
            return answers.get(kind, ([], True))

        sent = [event async for event in app_module._stream(feed, subscription, step, wait_s=0.01)]  # type: ignore[arg-type]
        return seen, sent

    feed = OneFeed()
    change = Change(seq=1, rows=[], counts={}, groups={}, queue=None)
    seen, sent = asyncio.run(run([change, None], {"open": (["opened"], True), "change": (["changed"], True)}))
    assert seen == ["open", "quiet", "change", "quiet"] and sent == ["retry: 2000\n\n", "opened", "changed"]
    seen, sent = asyncio.run(run([], {"fourth quiet": (["last"], False)}))
    assert seen == ["open", "quiet", "quiet", "quiet", "quiet"]
    assert sent == ["retry: 2000\n\n", ": keep-alive\n\n", "last"]  # the third quiet wait of 0.01 s passes 0.025 s
    assert feed.unsubscribed == 2
