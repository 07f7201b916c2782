"""loraq serve in a real browser (Playwright driving Debian's chromium) while a real queue runs.

On the tiny model, with `loraq run` and `loraq serve` in their own processes, as a user
would start them: the page follows a job from pending to running to completed without
a reload, its loss curve gains points, a cancel clicked on the page cancels the job in
the store, and a job named like a script shows as text (no dialog ever opens).

Set LORAQ_SCREENSHOTS=DIR to keep the screenshots of the three pages (docs/ holds the
committed ones). Skipped, with the reason, only where no chromium can be had.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="loraq serve needs the serve extra: pip install 'loraq[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the dev extra)")

CHROMIUM = os.environ.get("LORAQ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM}: install Debian's (apt-get install chromium; .ci/run does), "
                "or point LORAQ_CHROMIUM at one", allow_module_level=True)

from conftest import LORAQ, TINY_DEFAULTS, write_queue
from dashboard import HTML_PATH, SCRIPT_NAME, WORKER, enqueue, start_cli_server, stop
from loraq import api
from loraq.queue.store import Store
from loraq.workspace import Home

pytestmark = pytest.mark.slow

#: What this closed network needs: no background connections, no first-run work.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 300_000  # generous: two busy cores start a trainer process (torch) before the first step

QUEUE = TINY_DEFAULTS + """
jobs:
  - name: watched
    dataset: ./data/support.jsonl
    priority: 5
    training: {max_steps: 60}
  - name: victim
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    training: {max_steps: 400}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def row(page: Any, job_id: int) -> Any:
    return page.locator(f'tr[data-id="{job_id}"]')


def test_a_running_queue_watched_in_the_browser(browser: Any, workdir: Path) -> None:
    expect = sync_api.expect
    home = Home(workdir / ".loraq")
    api.submit(write_queue(workdir, QUEUE), home=home)
    with Store.open(home.db_path) as store:  # rows the queue file's name rules would refuse
        script = enqueue(store, SCRIPT_NAME)
        store.cancel(script)
        broken = enqueue(store, "broken-data", dataset=HTML_PATH, priority=9)
        claim = store.claim(WORKER, lease_s=60)
        assert claim is not None and claim.job.id == broken
        store.fail(broken, claim.epoch, kind="data", reason="<b onmouseover=alert(3)>row 3</b>: no 'text' key",
                   retryable=False)
    ids = {job.name: job.id for job in api.status(home).jobs}
    watched, victim = ids["watched"], ids["victim"]

    server, link = start_cli_server(home, loraq=LORAQ)
    base = link.split("/?")[0]
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    problems: list[str] = []
    context.on("page", lambda page: _watch(page, problems))
    run_log = (workdir / "run.log").open("w")
    run = None
    try:
        queue = context.new_page()
        queue.goto(link)  # the token becomes a cookie; the address bar loses it
        assert "token" not in queue.url
        loads = []
        queue.on("load", lambda _: loads.append(queue.url))

        # A name that is a script is text: shown as typed, never run.
        expect(queue.locator("td.name a", has_text="alert(1)")).to_have_text(SCRIPT_NAME)
        expect(queue.get_by_text("<b onmouseover=alert(3)>row 3</b>: no 'text' key")).to_be_visible()
        assert queue.locator("script:not([src]), img, b[onmouseover]").count() == 0
        expect(row(queue, watched).locator(".status")).to_have_text("pending")
        expect(queue.locator("#live")).to_have_class("live on")

        run = subprocess.Popen([LORAQ, "--home", str(home.root), "run", "--devices", "cpu"], cwd=workdir,
                               stdout=run_log, stderr=subprocess.STDOUT)
        expect(row(queue, watched).locator(".status")).to_have_text("running", timeout=WAIT_MS)

        # The job's page: its loss curve gains points while it trains.
        job = context.new_page()
        job.goto(f"{base}/jobs/{watched}")
        curve = job.locator("#job-curves svg.curves")
        expect(curve).to_have_attribute("data-points", _digits(), timeout=WAIT_MS)
        first = int(curve.get_attribute("data-points") or 0)
        expect(curve).not_to_have_attribute("data-points", str(first), timeout=WAIT_MS)
        assert int(curve.get_attribute("data-points") or 0) > first
        expect(job.locator("#log")).to_contain_text("loss", timeout=WAIT_MS)  # the log follows

        # A cancel clicked on a page cancels the job in the store (and the first page sees it live).
        other = context.new_page()
        other.goto(f"{base}/")
        row(other, victim).get_by_role("button", name="cancel").click()
        expect(row(other, victim).locator(".status")).to_have_text("cancelled")
        assert next(j.status for j in api.status(home).jobs if j.id == victim) == "cancelled"
        expect(row(queue, victim).locator(".status")).to_have_text("cancelled", timeout=30_000)

        expect(row(queue, watched).locator(".status")).to_have_text("completed", timeout=WAIT_MS)
        assert loads == [], f"the queue page reloaded: {loads}"
        expect(job.locator("#job-status")).to_have_text("completed", timeout=30_000)
        assert run.wait(timeout=WAIT_MS / 1000) == 1  # 1: a job of the queue failed (broken-data, before the run)
        assert {j.name: j.status for j in api.status(home).jobs} == {
            "watched": "completed", "victim": "cancelled", SCRIPT_NAME: "cancelled", "broken-data": "failed"}

        shots = Path(os.environ.get("LORAQ_SCREENSHOTS") or workdir / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        queue.screenshot(path=str(shots / "dashboard-queue.png"), full_page=True)
        job.reload()
        expect(job.locator("#job-curves svg.curves")).to_be_visible()
        job.screenshot(path=str(shots / "dashboard-job.png"), full_page=True)
        report = context.new_page()
        report.goto(f"{base}/report")
        expect(report.locator("h1")).to_have_text("loraq queue report")
        report.screenshot(path=str(shots / "dashboard-report.png"), full_page=True)
        assert not problems, problems
    finally:
        context.close()
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        run_log.close()
        assert stop(server) == 0
        sys.stdout.write((workdir / "run.log").read_text()[-3000:])


def _watch(page: Any, problems: list[str]) -> None:
    """Every script error, refused resource (a CSP violation included) and dialog is a failure."""
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))


def _digits() -> Any:
    import re

    return re.compile(r"^\d+$")
