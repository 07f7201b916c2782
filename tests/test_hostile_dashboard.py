"""Hostile input, round 3: the dashboard under load and bad requests (issue 20).

Each class has the example the hostile-input run found and a variant of our own. Where
the promise is about the server (bodies left unread, connections, tracebacks in its log,
memory) the test runs ``loraq serve`` as a user starts it, and speaks HTTP to it over a
socket; the rest use Starlette's client on the same app. Loopback only, bounded counts.
"""

from __future__ import annotations

import http.client
import json
import re
import resource
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest

pytest.importorskip("starlette", reason="loraq serve needs the serve extra: pip install 'loraq[serve]'")

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from conftest import LORAQ
from dashboard import enqueue, new_home, run_to_completion, stop, tags
from loraq.queue.store import NewJob, Store
from loraq.serve import Settings, create_app, security
from loraq.workspace import Home

TOKEN = "test-token-0123456789"
BASE = "http://127.0.0.1:8765"
MB = 1024 * 1024
BIDI = "\u202e"  # RIGHT-TO-LEFT OVERRIDE: "gpj.exe" reads as "exe.jpg"


# ---------------------------------------------------------------- a real server, spoken to over a socket


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    token: str
    log: Path  # the server's stderr

    @property
    def cookie(self) -> str:
        """The Cookie header a browser sends after opening the printed link."""
        status, headers, _ = request(self, "GET", f"/?token={self.token}")
        assert status == 303, status
        return headers["set-cookie"].split(";")[0]

    def rss(self, field: str = "VmHWM") -> int:
        """The server's resident memory in bytes (VmHWM: its peak so far)."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def serve(home: Home, tmp_path: Path, *extra: str, nofile: int | None = None) -> Served:
    """``loraq serve --port 0`` in its own process (stderr to a file: a pipe nobody reads would block it)."""
    log = tmp_path / f"serve-{time.monotonic_ns()}.err"

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log.open("w") as err:
        proc = subprocess.Popen([LORAQ, "--home", str(home.root), "serve", "--port", "0", *extra],
                                stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=limit_files)
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"open http://127\.0\.0\.1:(\d+)/\?token=(\S+)", line)
        if found:
            return Served(proc, int(found.group(1)), found.group(2), log)
    proc.wait(timeout=30)
    raise AssertionError(f"loraq serve printed no link: {log.read_text()}")


@pytest.fixture
def home(tmp_path: Path) -> Home:
    home = new_home(tmp_path)
    with Store.open(home.db_path) as store:
        for name in ("first", "second", "third"):
            enqueue(store, name)
    return home


@pytest.fixture
def server(home: Home, tmp_path: Path) -> Iterator[Served]:
    served = serve(home, tmp_path)
    yield served
    assert stop(served.proc) == 0
    assert "Traceback" not in served.stderr(), served.stderr()[-3000:]


def request(server: Served, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request, the path sent exactly as given (``//evil.example/`` included)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"host": f"127.0.0.1:{server.port}", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def send_until_answered(server: Served, head: str, chunk: bytes, most: int) -> tuple[bytes, int]:
    """Send ``head`` and then ``chunk`` after ``chunk``, up to ``most`` bytes, until the server answers.

    Returns the answer's first bytes and how much of the body was sent before it came.
    """
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sent = 0
    try:
        sock.sendall(head.encode("latin-1"))
        while sent < most:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:
            pass
        return answer, sent
    finally:
        sock.close()


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


# ---------------------------------------------------------------- bodies


def test_a_token_less_800_mb_post_is_refused_before_its_body_is_read(server: Served) -> None:
    """The example: a POST without the token announcing 800 MB is refused at its headers (it was read whole,
    1.36 GB of server memory, before the 403)."""
    before = server.rss()
    head = (f"POST /jobs/1/cancel HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 800000000\r\n\r\n")
    answer, sent = send_until_answered(server, head, b"x" * MB, most=800 * MB)
    assert status_of(answer) == 403
    assert sent < 200 * MB  # answered while the client was still sending: the body was never read
    assert server.rss() - before < 64 * MB
    # With the token, the same body is too large: 413, also before it is read.
    head = head.replace("\r\n\r\n", f"\r\nX-Loraq-Token: {server.token}\r\n\r\n", 1)
    answer, sent = send_until_answered(server, head, b"x" * MB, most=800 * MB)
    assert status_of(answer) == 413 and sent < 200 * MB
    assert server.rss() - before < 64 * MB
    assert request(server, "GET", "/", {"cookie": server.cookie})[0] == 200  # and it still serves its owner
    # A page asked for with a body it has no use for: answered, and the connection closed, the body unread.
    head = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nCookie: {server.cookie}\r\n"
            "Content-Length: 800000000\r\n\r\n")
    answer, sent = send_until_answered(server, head, b"x" * MB, most=800 * MB)
    assert status_of(answer) in (200, 413) and b"connection: close" in answer.lower() and sent < 200 * MB


def test_a_chunked_body_that_announces_no_length_is_cut_at_the_limit(server: Served) -> None:
    """The variant: no Content-Length (chunked), with the cookie: counted as read, refused past the form limit."""
    head = (f"POST /queue/pause HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nCookie: {server.cookie}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = f"{64 * 1024:x}\r\n".encode() + b"a" * (64 * 1024) + b"\r\n"
    answer, sent = send_until_answered(server, head, chunk, most=400 * MB)
    assert status_of(answer) == 413 and sent < 100 * MB


def test_the_body_limit_is_the_operators_to_set(home: Home, tmp_path: Path) -> None:
    served = serve(home, tmp_path, "--max-body-bytes", "100")
    try:
        form = f"token={served.token}&next=/&pad={'x' * 200}".encode()
        status, _, body = request(served, "POST", "/jobs/1/cancel", {
            "cookie": served.cookie, "content-type": "application/x-www-form-urlencoded"}, form)
        assert status == 413 and b"100 bytes" in body
        status, _, _ = request(served, "POST", "/jobs/1/cancel", {
            "cookie": served.cookie, "content-type": "application/x-www-form-urlencoded"},
            f"token={served.token}".encode())
        assert status == 303  # a form within the limit acts
    finally:
        assert stop(served.proc) == 0
    refused = subprocess.run([LORAQ, "--home", str(home.root), "serve", "--port", "0", "--max-body-bytes", "-5"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "open http" not in refused.stdout


def test_the_body_limit_is_middleware_an_api_can_reuse_with_its_own_error_shape() -> None:
    """How the /v1 API takes the same cap: a rule for its prefix, answering in its own JSON."""

    async def echo(request: Request) -> Response:
        return Response(str(len(await request.body())))

    def openai_error(limit: int) -> Any:
        return JSONResponse({"error": {"message": f"body over {limit} bytes", "type": "invalid_request_error",
                                       "param": None, "code": "request_too_large"}}, status_code=413,
                            headers={"connection": "close"})

    inner = Starlette(routes=[Route("/v1/files", echo, methods=["POST"]), Route("/other", echo, methods=["POST"])])
    app = security.BodyLimit(inner, 1000, rules=[security.BodyRule("/v1/", 5000, openai_error)])
    with TestClient(app) as client:  # type: ignore[arg-type]
        assert client.post("/other", content=b"x" * 1000).text == "1000"
        assert client.post("/other", content=b"x" * 1001).status_code == 413
        assert client.post("/v1/files", content=b"x" * 5000).text == "5000"
        r = client.post("/v1/files", content=b"x" * 5001)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
            for _ in range(10):
                yield b"y" * 1000

        r = client.post("/v1/files", content=chunks())
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        assert client.post("/other", content=chunks()).status_code == 413
    scope = {"type": "http", "headers": [(b"content-length", b"800000000")]}
    assert security.body_too_large(scope, 1000) and not security.body_too_large(scope, 800_000_000)


# ---------------------------------------------------------------- connections


def _idle_connections(port: int, n: int, first_bytes: bytes = b"") -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        if first_bytes:
            sock.sendall(first_bytes)
        socks.append(sock)
    return socks


def test_300_idle_connections_under_ulimit_256_do_not_keep_the_owner_out(home: Home, tmp_path: Path) -> None:
    """The example: 300 connections that never send a request, the server limited to 256 files. It starved
    the owner and wrote 81 MB of tracebacks; now idle connections are closed first, and logged in a line."""
    served = serve(home, tmp_path, nofile=256)
    cookie = served.cookie
    socks = _idle_connections(served.port, 300)
    try:
        for _ in range(3):
            status, _, body = request(served, "GET", "/", {"cookie": cookie})
            assert status == 200 and b"first" in body
        assert len(list(Path(f"/proc/{served.proc.pid}/fd").iterdir())) < 256
    finally:
        for sock in socks:
            sock.close()
        assert stop(served.proc) == 0
    err = served.stderr()
    assert "Traceback" not in err and len(err) < 4000, err[-3000:]
    assert "closed the connection idle the longest" in err and len(err.splitlines()) <= 5


def test_slow_headers_cannot_hold_connections_from_a_page_that_streams(home: Home, tmp_path: Path) -> None:
    """The variant: connections that send half a request (slowloris) while the owner's page follows its
    stream; a low --max-connections. The owner's stream is never the one closed, and pages still load."""
    served = serve(home, tmp_path, "--max-connections", "8")
    cookie = served.cookie
    stream = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    stream.request("GET", "/stream?since=0", headers={"cookie": cookie})
    live = stream.getresponse()
    assert live.status == 200 and live.readline() == b"retry: 2000\n"
    socks = _idle_connections(served.port, 60, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        assert request(served, "GET", "/jobs/1", {"cookie": cookie})[0] == 200
        with Store.open(home.db_path) as store:
            store.cancel("second")
        line = b""
        while b"cancelled" not in line:  # the stream is still open, and tells the change
            line = live.readline()
            assert line, "the owner's stream was closed"
    finally:
        stream.close()
        for sock in socks:
            sock.close()
        assert stop(served.proc) == 0
    err = served.stderr()
    assert "Traceback" not in err and len(err.splitlines()) <= 5, err[-3000:]


def test_refused_connections_are_told_in_one_line_at_a_time(clock: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A flood of refusals is a line now and then with counts, never a line (or a traceback) each."""
    from loraq.serve.server import Refusals

    refusals = Refusals(64, every_s=10.0, clock=clock)
    with caplog.at_level("WARNING", logger="loraq.serve"):
        for _ in range(1000):
            refusals.note("refused a connection")
            clock.advance(0.001)
        clock.advance(10.0)
        refusals.note("closed the connection idle the longest")
        refusals.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "×1" in lines[0] and "refused a connection ×999" in lines[1], lines
    assert all(r.exc_info is None for r in caplog.records)


def test_a_connection_that_never_finishes_its_headers_is_closed_by_the_server(server: Served) -> None:
    """Below the limit too: a connection that sends nothing, or half a request, is closed (the header
    timeout), not held open for as long as the other side likes."""
    silent, half = _idle_connections(server.port, 1) + _idle_connections(server.port, 1, b"GET / HTTP/1.1\r\n")
    try:
        for sock in (silent, half):
            sock.settimeout(120)
            assert sock.recv(1024) == b""  # the server closed it
    finally:
        silent.close()
        half.close()


# ---------------------------------------------------------------- numbers past their range


HUGE = "99999999999999999999999"


def test_huge_numbers_in_urls_and_stream_ids_are_400_or_404_never_500(server: Served) -> None:
    cookie = {"cookie": server.cookie}
    for path in (f"/jobs/{HUGE}", f"/jobs/{HUGE}/log", f"/jobs/{HUGE}/stream", f"/?page={HUGE}",
                 f"/stream?since={HUGE}", f"/report?page={HUGE}", f"/jobs/1/log?attempt={HUGE}",
                 f"/jobs/1/stream?since={HUGE}", f"/jobs/1/stream?log={HUGE}"):
        status, _, body = request(server, "GET", path, cookie)
        assert status in (400, 404), (path, status)
        assert b"Traceback" not in body
    for last_event_id in (HUGE, f"1.{HUGE}", f"{HUGE}.0"):
        for path in ("/stream", "/jobs/1/stream"):
            status, _, _ = request(server, "GET", path, {**cookie, "last-event-id": last_event_id})
            assert status == 400, (path, last_event_id, status)
    status, _, _ = request(server, "POST", f"/jobs/{HUGE}/cancel", {**cookie, "x-loraq-token": server.token})
    assert status == 404


def test_numbers_at_the_edge_of_the_range_and_in_other_digits(server: Served) -> None:
    """The variant: 2**63 - 1 (SQLite's largest: no such job), 2**63 (past it), and digits that Python's int()
    reads but a URL should not (Arabic-Indic, full-width)."""
    cookie = {"cookie": server.cookie}
    for path in (f"/jobs/{2**63 - 1}", f"/jobs/{2**63}", f"/jobs/{2**63}/log"):
        assert request(server, "GET", path, cookie)[0] == 404, path
    for value in (str(2**63), "%D9%A1%D9%A2", "%EF%BC%91", "-1", "1e3", "%201"):
        for path in (f"/?page={value}", f"/stream?since={value}", f"/report?page={value}"):
            assert request(server, "GET", path, cookie)[0] == 400, path
    assert request(server, "GET", "/?page=1", cookie)[0] == 200
    assert request(server, "GET", "/?page=0", cookie)[0] == 200  # read as the first page, as before


# ---------------------------------------------------------------- the cookie and the redirect


def test_the_cookie_is_named_for_its_port_and_refused_by_another(home: Home, tmp_path: Path) -> None:
    """The example: the token cookie went to every port of 127.0.0.1. It is now named for the dashboard's
    port and holds a digest of the token and that name, never the token; another dashboard refuses it."""
    a = serve(home, tmp_path)
    b = serve(home, tmp_path)
    try:
        name, value = a.cookie.split("=", 1)
        assert name == f"loraq-token-{a.port}" and value != a.token and a.token not in value
        assert request(a, "GET", "/", {"cookie": f"{name}={value}"})[0] == 200
        b_name = f"loraq-token-{b.port}"
        for cookie in (f"{name}={value}", f"{b_name}={value}"):  # A's cookie arriving at B, as named or renamed
            assert request(b, "GET", "/", {"cookie": cookie})[0] == 403, cookie
        # The variant: the token itself in the cookie (what the cookie held before) opens nothing.
        assert request(a, "GET", "/", {"cookie": f"{name}={a.token}"})[0] == 403
        assert request(b, "GET", "/", {"cookie": f"{b_name}={b.token}"})[0] == 403
        cookie_header = request(a, "GET", f"/?token={a.token}")[1]["set-cookie"].lower()
        assert "httponly" in cookie_header and "samesite=strict" in cookie_header
    finally:
        assert stop(a.proc) == 0 and stop(b.proc) == 0


def test_the_token_link_never_redirects_off_site(server: Served) -> None:
    """The example ``//evil.example/?token=`` and variants: a backslash, more slashes, an encoded slash."""
    for path in ("//evil.example/", "/\\evil.example/", "///evil.example/", "/%2F%2Fevil.example/",
                 "//evil.example/jobs/1", "/%5Cevil.example"):
        status, headers, _ = request(server, "GET", f"{path}?token={server.token}&status=pending")
        assert status == 303, path
        location = headers["location"]
        # A browser reads a backslash as a slash: neither may start the address, and none is left raw.
        assert location.startswith("/") and not location.startswith(("//", "/\\")) and "\\" not in location, location
        assert urljoin(f"http://127.0.0.1:{server.port}/jobs/", location).startswith(f"http://127.0.0.1:{server.port}/")
    status, headers, _ = request(server, "GET", f"/jobs/1?token={server.token}&status=pending")
    assert headers["location"] == "/jobs/1?status=pending"  # a local path keeps its place and its query


# ---------------------------------------------------------------- files are streamed


def _write_log(path: Path, size: int, line: str = "step 1 loss 2.345 lr 0.0002 grad 0.5\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = (line * (MB // len(line) + 1))[:MB]
    block = block[: block.rfind("\n") + 1]
    with path.open("w", encoding="utf-8") as fh:
        written = 0
        while written < size:
            fh.write(block)
            written += len(block)


def _read_all(server: Served, path: str, cookie: str) -> tuple[int, int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("GET", path, headers={"cookie": cookie})
        response = conn.getresponse()
        head = response.read(64 * 1024)
        total = len(head)
        while True:
            data = response.read(MB)
            if not data:
                break
            total += len(data)
        return response.status, total, head
    finally:
        conn.close()


def test_a_big_log_and_a_big_saved_report_are_streamed_not_read_whole(home: Home, server: Served) -> None:
    """The example: /jobs/N/log and /reports/F read the whole file into memory. 96 MB each, served in
    chunks: the server's peak memory grows by far less than the file."""
    with Store.open(home.db_path) as store:
        job = run_to_completion(store)
    _write_log(home.attempt_dir(job, 1) / "train.log", 96 * MB)
    _write_log(home.reports_dir / "big.md", 96 * MB, "| a | row of a saved report |\n")
    cookie = server.cookie
    for path in (f"/jobs/{job}/log", "/reports/big.md"):
        before = server.rss("VmRSS")
        status, total, head = _read_all(server, path, cookie)
        assert status == 200 and total >= 96 * MB, path
        assert head.startswith((b"step 1 loss", b"| a | row")), head[:100]
        assert server.rss() - before < 48 * MB, (path, server.rss() - before)


def test_a_streamed_log_and_saved_report_are_escaped_as_loraq_logs_prints_it(home: Home, server: Served) -> None:
    """The variant: a bidi override and an escape sequence in a log, and a UTF-8 character cut by the chunk
    boundary: the override shows as \\u202e, the cut character arrives whole."""
    with Store.open(home.db_path) as store:
        job = run_to_completion(store)
    log = home.attempt_dir(job, 1) / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cut = "a" * (64 * 1024 - 1) + "é\n"  # é's two bytes straddle the first 64 KB chunk
    log.write_text(cut + f"step 2 name {BIDI}gpj.exe \x1b]0;owned\x07 done\n", encoding="utf-8")
    status, _, body = request(server, "GET", f"/jobs/{job}/log", {"cookie": server.cookie})
    text = body.decode("utf-8")
    assert status == 200 and "aé\n" in text and "\ufffd" not in text
    assert BIDI not in text and "\x1b" not in text and "\\u202egpj.exe \\x1b]0;owned\\x07 done" in text
    # A saved report the same way (its JSON is ASCII, and stays byte for byte what was saved).
    (home.reports_dir / "report.html").write_text(f"<p>{BIDI}gpj.exe</p>\n", encoding="utf-8")
    (home.reports_dir / "report.json").write_text(json.dumps({"name": f"{BIDI}x\x1b"}) + "\n", encoding="utf-8")
    assert request(server, "GET", "/reports/report.html", {"cookie": server.cookie})[2] == b"<p>\\u202egpj.exe</p>\n"
    saved = request(server, "GET", "/reports/report.json", {"cookie": server.cookie})[2]
    assert saved == (home.reports_dir / "report.json").read_bytes() and json.loads(saved)["name"] == f"{BIDI}x\x1b"


# ---------------------------------------------------------------- the report is paged


def _many_jobs(home: Home, n: int) -> None:
    with Store.open(home.db_path) as store:
        for start in range(0, n, 5000):
            store.enqueue([NewJob(name=f"job-{i}", spec={"spec": {"group": f"g{i % 3}"}}, base_key="b")
                           for i in range(start, min(n, start + 5000))])


def _report_rows(html: str) -> int:
    return sum(1 for t in tags(html) if t.name == "tr" and t.attrs.get("class") in
               ("pending", "running", "completed", "failed", "cancelled"))


def make_client(home: Home) -> TestClient:
    client = TestClient(create_app(Settings(home=home, token=TOKEN, poll_s=0.05)), base_url=BASE,
                        follow_redirects=False)
    return client


def test_the_report_page_is_paged_at_20000_jobs(tmp_path: Path) -> None:
    """The example (200,000 jobs: 66 s, 124 MB for one page), at a tenth: a page holds 50 jobs, the same
    page as at 200 jobs, whatever the queue's length."""
    sizes = {}
    for n in (200, 20_000):
        home = new_home(tmp_path / f"n{n}")
        _many_jobs(home, n)
        with make_client(home) as c:
            c.get(f"/?token={TOKEN}")
            first = c.get("/report")
            assert first.status_code == 200 and _report_rows(first.text) == 50
            assert f"jobs 1–50 of {n}" in first.text and "/report?page=2" in first.text
            last = c.get(f"/report?page={n // 50}")
            assert _report_rows(last.text) == 50 and "next →" not in last.text
            assert f"{n} pending" in first.text  # the counts are of every job
            sizes[n] = len(first.text)
    assert sizes[20_000] < sizes[200] * 1.1, sizes


def test_a_short_queue_is_one_page_of_report_as_before(tmp_path: Path) -> None:
    home = new_home(tmp_path)
    _many_jobs(home, 7)
    with make_client(home) as c:
        c.get(f"/?token={TOKEN}")
        page = c.get("/report").text
        assert _report_rows(page) == 7 and "next →" not in page and "jobs 1–7" not in page
        assert "<h2>sweep g0</h2>" in page
        assert c.get("/report?page=x").status_code == 400


# ---------------------------------------------------------------- the queue stream sends what the page shows


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    kind, data = None, []
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and kind:
            yield kind, json.loads("".join(data))
            kind, data = None, []


def test_a_queue_page_is_sent_its_own_rows_only(tmp_path: Path) -> None:
    """The example: every changed row went to every page. Page 1 of 3 is sent the rows it lists; a burst of
    changes to jobs on other pages reaches it as a count (the page offers a reload) and totals, never as rows."""
    home = new_home(tmp_path)
    _many_jobs(home, 250)
    with make_client(home) as c:
        c.get(f"/?token={TOKEN}")
        page = c.get("/").text
        stream_url = next(t.attrs["data-stream"] for t in tags(page) if t.name == "body")
        assert stream_url is not None and "page=1" in stream_url
        with c.stream("GET", stream_url) as r:
            events = _sse_events(r.iter_lines())
            with Store.open(home.db_path) as store:
                for name in [f"job-{i}" for i in range(150, 250)] + ["job-5"]:  # 100 of pages 2-3, 1 of page 1
                    store.cancel(name)
            seen: set[int] = set()
            unseen, counts = 0, ""
            while not (seen and "<b>101</b> cancelled" in counts):
                kind, data = next(events)
                assert kind == "queue"
                counts = data["sections"]["counts"]
                seen |= {row["id"] for row in data["rows"]}
                unseen += data["unseen"]
            # job-5 is job 6, the one row of this page that changed; the others are counted (a page that
            # catches up may count a job twice: it only offers a reload).
            assert seen == {6} and unseen >= 100
            with Store.open(home.db_path) as store:
                enqueue(store, "late")  # belongs to "all jobs", but page 1 is full: counted, not sent
            while "<b>251</b> jobs" not in data["sections"]["counts"]:  # past any late copy of the burst
                kind, data = next(events)
                assert {row["id"] for row in data["rows"]} <= {6}  # at most a late copy of its own row
            assert data["rows"] == [] and data["unseen"] >= 1


def test_a_filtered_last_page_gets_new_jobs_and_nothing_of_other_filters(tmp_path: Path) -> None:
    """The variant: a sweep's page (?group=) with room; changes in another sweep send no rows."""
    home = new_home(tmp_path)
    with Store.open(home.db_path) as store:
        for i in range(4):
            enqueue(store, f"a-{i}", group="sweep-a")
            enqueue(store, f"b-{i}", group="sweep-b")
    with make_client(home) as c:
        c.get(f"/?token={TOKEN}")
        page = c.get("/?group=sweep-a").text
        stream_url = next(t.attrs["data-stream"] for t in tags(page) if t.name == "body")
        assert stream_url is not None and "group=sweep-a" in stream_url
        with c.stream("GET", stream_url) as r:
            events = _sse_events(r.iter_lines())
            with Store.open(home.db_path) as store:
                store.cancel("b-1")
                store.cancel("b-2")
            kind, data = next(events)
            assert data["rows"] == [] and data["unseen"] == 0  # the totals moved; no row of sweep-b
            with Store.open(home.db_path) as store:
                new = enqueue(store, "a-new", group="sweep-a")
                enqueue(store, "b-new", group="sweep-b")
                store.cancel("a-0")
            ids: list[int] = []
            while len(ids) < 2:
                kind, data = next(events)
                ids += [row["id"] for row in data["rows"]]
            assert sorted(ids) == [1, new]


# ---------------------------------------------------------------- bidi and control characters


def test_bidi_overrides_show_escaped_on_every_page_and_update(tmp_path: Path) -> None:
    """The example: a job named with U+202E showed reversed text. Names, errors, logs, the report and the
    live fragments show it as \\u202e, as the command line does."""
    home = new_home(tmp_path)
    name = f"invoice-{BIDI}fdp.exe"
    with Store.open(home.db_path) as store:
        job = enqueue(store, name)
        claim = store.claim(__import__("dashboard").WORKER, lease_s=60)
        assert claim is not None
        store.fail(job, claim.epoch, kind="data", reason=f"row 3: {BIDI}eulav\u2066 bad\x1b[31m", retryable=False)
    log = home.attempt_dir(job, 1) / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"loss 2.0 {BIDI}txet\n", encoding="utf-8")
    with make_client(home) as c:
        c.get(f"/?token={TOKEN}")
        pages = {path: c.get(path).text for path in ("/", f"/jobs/{job}", "/report", f"/jobs/{job}/log")}
        with c.stream("GET", "/stream?since=0") as r:
            kind, data = next(_sse_events(r.iter_lines()))
        pages["stream"] = json.dumps(data, ensure_ascii=False)
    for path, text in pages.items():
        for char in (BIDI, "\u2066", "\x1b"):
            assert char not in text, (path, repr(char))
    assert "invoice-\\u202efdp.exe" in pages["/"] and "invoice-\\u202efdp.exe" in pages[f"/jobs/{job}"]
    assert "\\u202eeulav\\u2066 bad\\x1b[31m" in pages[f"/jobs/{job}"]
    assert "\\u202etxet" in pages[f"/jobs/{job}"] and "\\u202etxet" in pages[f"/jobs/{job}/log"]
    assert "invoice-\\u202efdp.exe" in pages["/report"] and "invoice-\\\\u202efdp.exe" in pages["stream"]


def test_other_invisible_controls_and_the_log_stream_are_escaped_too(tmp_path: Path) -> None:
    """The variant: U+2028 (a line separator), U+200F, C1 controls in a sweep name and a job's followed log."""
    home = new_home(tmp_path)
    group = "sweep\u2028\u200f\x85x"
    with Store.open(home.db_path) as store:
        job = enqueue(store, "plain", group=group)
    log = home.attempt_dir(job, 1) / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("", encoding="utf-8")
    with make_client(home) as c:
        c.get(f"/?token={TOKEN}")
        queue = c.get("/").text
        assert "\u2028" not in queue and "\u200f" not in queue and "\x85" not in queue
        assert "sweep\\u2028\\u200f\\x85x" in queue
        with Store.open(home.db_path) as store:  # a running attempt with a log being written
            claim = store.claim(__import__("dashboard").WORKER, lease_s=60)
            assert claim is not None
        log = home.attempt_dir(job, claim.attempt) / "train.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"step 1 {BIDI}abc\u2067\n", encoding="utf-8")
        with c.stream("GET", f"/jobs/{job}/stream?since=0&log=0") as r:
            for kind, data in _sse_events(r.iter_lines()):
                if kind == "log" and data["text"]:
                    assert data["text"] == "step 1 \\u202eabc\\u2067\n"
                    break


# ---------------------------------------------------------------- in a real browser


@pytest.fixture
def chromium() -> Iterator[Any]:
    import os
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the dev extra)")
    path = os.environ.get("LORAQ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.skip(f"no chromium at {path}: apt-get install chromium, or point LORAQ_CHROMIUM at one")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=args)
        yield browser, sync_api.expect
        browser.close()


def test_a_filtered_page_in_a_browser_follows_its_own_jobs_and_shows_bidi_escaped(
        chromium: Any, home: Home, tmp_path: Path) -> None:
    """The page's script takes the rows its stream chose for it: a new pending job appears on the pending
    page, a job cancelled elsewhere updates in place, and a name with U+202E reads as typed, escaped."""
    browser, expect = chromium
    served = serve(home, tmp_path)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{served.port}/?status=pending&token={served.token}")
        expect(page.locator("#live")).to_have_class("live on")
        with Store.open(home.db_path) as store:
            new = enqueue(store, f"late-{BIDI}txt.exe")
            store.cancel("second")
        expect(page.locator(f'tr[data-id="{new}"] td.name')).to_have_text("late-\\u202etxt.exe")
        expect(page.locator('tr[data-id="2"] .status')).to_have_text("cancelled")
        assert page.locator("#notice").is_hidden()
        cookies = context.cookies()
        assert [c["name"] for c in cookies] == [f"loraq-token-{served.port}"] and cookies[0]["value"] != served.token
    finally:
        context.close()
        assert stop(served.proc) == 0
    assert "Traceback" not in served.stderr()
