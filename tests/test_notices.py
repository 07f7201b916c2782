"""What dependencies print never reaches loraq's users: stdout and stderr carry loraq's own words only.

transformers 5.25 pulled in ``kernels``, whose import logs "Skipping publisher trust check ..." and
made bitsandbytes log "Failed to load CPU gemm_4bit_forward ..." into every merged export's output.
:mod:`loraq.notices` routes every way a library can write (a logging handler it set up, logging's
last resort, warnings, print, writes to fds 1 and 2) into the home's log while a command runs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import LORAQ, TINY_DEFAULTS, write_queue
from loraq import notices

NOISE = "noisylib-notice"


def test_every_kind_of_library_output_goes_to_the_home_log_and_loraqs_own_lines_do_not(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    early = logging.getLogger("noisylib.early")  # a library that set up its own stderr handler at import
    early.addHandler(logging.StreamHandler(sys.stderr))
    early.propagate = False
    try:
        with notices.routed(home):
            early.warning(f"{NOISE} 1: own handler")
            logging.getLogger("noisylib.bare").warning(f"{NOISE} 2: no handler, logging's last resort")
            warnings.warn(f"{NOISE} 3: a warning", UserWarning, stacklevel=1)
            print(f"{NOISE} 4: print to stdout")
            print(f"{NOISE} 5: print to stderr", file=sys.stderr)
            os.write(1, f"{NOISE} 6: fd 1\n".encode())
            os.write(2, f"{NOISE} 7: fd 2\n".encode())
            notices.out().write("loraq's own result\n")
            notices.err().write("loraq: its own error line\n")
    finally:
        early.handlers.clear()
    seen = capfd.readouterr()
    assert NOISE not in seen.out + seen.err
    assert "loraq's own result" in seen.out and "loraq: its own error line" in seen.err
    log = (home / "logs" / notices.LOG_NAME).read_text()
    for n in range(1, 8):
        assert f"{NOISE} {n}:" in log, (n, log)
    assert "loraq's own" not in log
    # After the command, the process writes where it did before.
    print("after")
    assert capfd.readouterr().out == "after\n"


def test_a_home_that_does_not_exist_gets_no_log_and_the_output_is_still_kept_off_the_terminal(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with notices.routed(tmp_path / "absent"):
        os.write(2, f"{NOISE}: fd 2\n".encode())
        logging.getLogger("noisylib").error(f"{NOISE}: logged")
    seen = capfd.readouterr()
    assert NOISE not in seen.out + seen.err
    assert not (tmp_path / "absent").exists()


def test_the_log_keeps_a_bounded_tail_of_each_command(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with notices.routed(tmp_path):
        os.write(2, b"x" * (notices.KEEP_BYTES + 1000) + b"\nthe end\n")
    capfd.readouterr()
    log = (tmp_path / "logs" / notices.LOG_NAME).read_text()
    assert "the end" in log and "bytes left out" in log
    assert len(log) < notices.KEEP_BYTES + 1000


# A library that is noisy on import, as transformers 5.25 (with kernels) and bitsandbytes were: it logs
# through a handler it sets up, warns, prints and writes to fd 2 the first time transformers is imported
# (which loraq does inside commands: inspect --base, export). Installed through sitecustomize.
NOISY_IMPORT = f'''
import builtins, logging, os, sys, warnings
_import = builtins.__import__
_done = []
def _noisy(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    if name.startswith("transformers") and not _done:
        _done.append(1)
        handler = logging.StreamHandler(sys.stderr)
        logger = logging.getLogger("kernels.fake")
        logger.addHandler(handler)
        logger.warning("{NOISE}: Skipping publisher trust check (logged)")
        logging.getLogger("bitsandbytes.fake").warning("{NOISE}: Failed to load CPU gemm_4bit_forward")
        warnings.warn("{NOISE}: a FutureWarning", FutureWarning)
        print("{NOISE}: printed", file=sys.stderr)
        os.write(2, b"{NOISE}: C-level write\\n")
    return module
builtins.__import__ = _noisy
'''


@pytest.mark.slow
def test_every_command_keeps_stderr_clean_on_the_happy_path(workdir: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NOISY_IMPORT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    env.pop("LORAQ_DEBUG", None)
    home = workdir / ".loraq"
    queue = write_queue(workdir, TINY_DEFAULTS + "jobs:\n  - {name: sql, dataset: ./data/sql.jsonl}\n")

    def loraq(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=600,
                                cwd=workdir, env=env)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        # loraq's own words only: the report says on stderr where it wrote (its stdout is the report).
        own = [line for line in result.stderr.splitlines() if args[0] == "report" and line.startswith("wrote ")]
        assert result.stderr.splitlines() == own, (args, result.stderr)
        assert NOISE not in result.stdout, (args, result.stdout)
        return result

    loraq("submit", str(queue), "--dry-run")
    loraq("submit", str(queue))
    loraq("run", "--devices", "cpu")
    adapter = home / "adapters" / "sql"
    for args in (["status"], ["status", "--json"], ["show", "sql"], ["show", "sql", "--json"], ["logs", "sql"],
                 ["report"], ["report", "--format", "json"],
                 ["report", "--format", "html", "-o", str(tmp_path / "report.html")],
                 ["inspect", str(adapter)],
                 ["inspect", str(adapter), "--base", "./models/tiny", "--data", "./data/sql.jsonl", "--json"],
                 ["export", "sql", "--to", "merged", str(tmp_path / "merged")],
                 ["export", "sql", "--to", "gguf", str(tmp_path / "sql.gguf")],
                 ["clone", "sql", "sql-2", "--set", "lora.r=8"], ["cancel", "sql-2"], ["retry", "sql-2"],
                 ["pause"], ["resume"]):
        loraq(*args)
    # The notices were kept, in the home's log, for whoever looks for them.
    log = (home / "logs" / notices.LOG_NAME).read_text()
    assert f"{NOISE}: Skipping publisher trust check" in log
    assert f"{NOISE}: C-level write" in log
