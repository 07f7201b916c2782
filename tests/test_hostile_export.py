"""Hostile input, round 3: export and warm starts (issue 20, section 2).

Each class has the issue's own example and a variant. Everything runs for real: the
adapters are trained by ``loraq run`` on the tiny base (or written by PEFT or byte by
byte), every command is a ``loraq`` process, and what must not be touched is looked at
on disk afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import adapters
from conftest import LORAQ, write_queue

gguf = pytest.importorskip("gguf", reason="the export extra (pip install 'loraq[export]') is not installed")

DEFAULTS = """\
defaults:
  base_model: ./models/tiny
  lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}
  training: {max_steps: 6, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 192, save_steps: 3, logging_steps: 1, seed: 3}
  validation: {split: 0.1}
retry_backoff_s: 0
"""
SECRET = {"peft_type": "LORA", "r": "SECRET-r-4242", "lora_alpha": "SECRET-alpha-77", "target_modules": "SECRET-tm",
          "architectures": ["SECRET-ARCH-9"], "model_type": "SECRET-TYPE", "api_key": "SECRET-KEY-XYZ"}
#: Runs the loraq CLI with an audit hook that records any DNS lookup or connection (in the file
#: $NETWORK_LOG: a library may catch the error and route its notice away from stderr) and refuses it.
NO_NETWORK = """
import os, sys
def hook(event, args):
    if event in ("socket.getaddrinfo", "socket.connect", "socket.gethostbyname"):
        with open(os.environ["NETWORK_LOG"], "a") as log:
            log.write(f"{event} {args[:2]!r}\\n")
        raise RuntimeError(f"NETWORK ATTEMPT: {event} {args[:2]!r}")
sys.addaudithook(hook)
from loraq.cli import main
sys.argv = ["loraq", *sys.argv[1:]]
sys.exit(main())
"""


def loraq(*args: str, cwd: Path, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    home = home if home is not None else cwd / ".loraq"
    return subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def loraq_offline_unset(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """loraq as a user without HF_HUB_OFFLINE runs it; asserts that it attempted no network connection."""
    log = cwd / "network-attempts.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", NO_NETWORK, "--home", str(cwd / ".loraq"), *args],
                            capture_output=True, text=True, timeout=600, cwd=cwd, env=env | {"NETWORK_LOG": str(log)})
    assert not log.exists(), f"network attempts: {log.read_text()}"
    assert "NETWORK ATTEMPT" not in result.stderr
    return result


def lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.strip().splitlines() if line.startswith("loraq:")]


def tree(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its size: what must come through an export untouched."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def no_secret(result: subprocess.CompletedProcess[str]) -> None:
    out = result.stdout + result.stderr
    assert "SECRET" not in out, out


@pytest.fixture(scope="module")
def project(tiny_model: Path, demo_datasets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose queue trained and published 'chat' (chat_template: chatml) and 'sql' on the tiny base."""
    root = tmp_path_factory.mktemp("hostile-export")
    shutil.copytree(tiny_model, root / "models" / "tiny")
    (root / "data").mkdir()
    for key in ("sql", "support"):
        shutil.copy(demo_datasets[key], root / "data" / demo_datasets[key].name)
    queue = write_queue(root, DEFAULTS + f"""
jobs:
  - name: chat
    dataset: ./data/{demo_datasets["support"].name}
    chat_template: chatml
  - name: sql
    dataset: {{path: ./data/{demo_datasets["sql"].name}, format: prompt_completion}}
""")
    for command in (["submit", str(queue)], ["run", "-q"]):
        result = loraq(*command, cwd=root)
        assert result.returncode == 0, result.stdout + result.stderr
    return root


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSON file outside every root, whose values must never be printed."""
    path = tmp_path_factory.mktemp("secret") / "secret.json"
    path.write_text(json.dumps(SECRET))
    return path


# ---------------------------------------------------------------- export destroys what it must not


def test_force_never_replaces_the_project_folder_or_the_home(project: Path) -> None:
    before, home_before = tree(project / "models"), tree(project / ".loraq" / "adapters")
    cases = {
        # the examples: the project folder (the home inside it), and the home itself
        ("--to", "merged", ".", "--force"): "holds the home",
        ("--to", "merged", ".loraq", "--force"): "is the home",
        # variants: a parent of the working folder, the working folder by its absolute name, as a GGUF
        ("--to", "gguf", "..", "--force"): "holds the home",
        ("--to", "merged", str(project), "--force"): "holds the home",
        ("--to", "merged", ".loraq/jobs", "--force"): "not a merged model loraq exported",
        ("--to", "gguf", ".loraq/loraq.db", "--force"): "not a GGUF file",
        ("--to", "merged", "models/tiny", "--force"): "not a merged model loraq exported",
        ("--to", "merged", ".loraq/adapters/sql", "--force"): "is the adapter's folder",
    }
    for args, why in cases.items():
        result = loraq("export", "sql", *args, cwd=project)
        assert result.returncode == 1 and len(lines(result)) == 1 and why in result.stderr, (args, result.stderr)
    assert tree(project / "models") == before and tree(project / ".loraq" / "adapters") == home_before
    assert (project / ".loraq" / "loraq.db").stat().st_size > 0
    status = loraq("status", "--json", cwd=project)
    assert status.returncode == 0 and {j["name"] for j in json.loads(status.stdout)["jobs"]} == {"chat", "sql"}
    assert not [p for p in project.parent.iterdir() if p.name.startswith(".loraq-tmp")]


def test_the_base_folder_and_the_working_folder_are_kept_even_when_marked_as_an_export(project: Path,
                                                                                      tmp_path: Path) -> None:
    """A folder holding the base (or the working folder) is refused before its contents are even looked at."""
    fake = tmp_path / "work"
    shutil.copytree(project / "models" / "tiny", fake / "base")
    (fake / "base" / "loraq-export.json").write_text(json.dumps({"loraq_export": 1, "kind": "merged"}))
    (fake / "loraq-export.json").write_text(json.dumps({"loraq_export": 1, "kind": "merged"}))
    before = tree(fake)
    for dest, why in (("base", "is the base model's folder"), (".", "is the working folder")):
        result = loraq("--allow-root", str(project), "export", "sql", "--to", "merged", dest, "--force",
                       "--base", "base", cwd=fake, home=project / ".loraq")
        assert result.returncode == 1 and why in result.stderr, result.stderr
    assert tree(fake) == before


def test_force_never_replaces_a_device_or_a_fifo(project: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    targets = {fifo: "is a FIFO"}
    if os.geteuid() == 0:  # the issue's /dev/null, as a device node of our own (never the machine's)
        null = tmp_path / "null"
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        targets[null] = "is a device"
    for path, why in targets.items():
        for kind in ("gguf", "merged"):
            result = loraq("export", "sql", "--to", kind, str(path), "--force", cwd=project)
            assert result.returncode == 1 and why in result.stderr, result.stderr
        mode = os.lstat(path).st_mode
        assert stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in targets)


def test_force_replaces_an_earlier_gguf_only(project: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes, not a GGUF file")
    result = loraq("export", "sql", "--to", "gguf", str(notes), "--force", cwd=project)
    assert result.returncode == 1 and "is not a GGUF file" in result.stderr
    assert notes.read_text() == "my notes, not a GGUF file"
    out = tmp_path / "sql.gguf"
    assert loraq("export", "sql", "--to", "gguf", str(out), cwd=project).returncode == 0
    again = loraq("export", "sql", "--to", "gguf", str(out), "--force", cwd=project)
    assert again.returncode == 0, again.stderr
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "sql.gguf"]


def test_a_symlinked_target_is_refused_and_leaves_nothing(project: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.gguf"
    victim.write_bytes(b"GGUF but someone else's")
    (tmp_path / "link.gguf").symlink_to(victim)  # the example: a link to a file
    (tmp_path / "dangling.gguf").symlink_to(tmp_path / "nowhere.gguf")  # variant: a link to nothing yet
    (tmp_path / "dirlink").symlink_to(project / "models")  # variant: a link to a folder, as a merged target
    for kind, name in (("gguf", "link.gguf"), ("gguf", "dangling.gguf"), ("merged", "dirlink")):
        for force in ((), ("--force",)):
            result = loraq("export", "sql", "--to", kind, str(tmp_path / name), *force, cwd=project)
            assert result.returncode == 1 and "is a symlink" in result.stderr, result.stderr
    assert victim.read_bytes() == b"GGUF but someone else's" and not (tmp_path / "nowhere.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.gguf", "dirlink", "link.gguf", "victim.gguf"]
    assert (project / "models" / "tiny" / "config.json").is_file()


def test_the_next_export_clears_what_a_killed_one_left(project: Path, tmp_path: Path) -> None:
    # What a kill leaves: a hidden folder or file beside the target, named for it.
    left = [tmp_path / ".loraq-tmp-sql.gguf.0123456789ab", tmp_path / ".loraq-tmp-sql.gguf.ba9876543210"]
    left[0].write_bytes(b"GGUF half written")
    left[1].mkdir()
    (left[1] / "model.safetensors").write_bytes(b"\0" * 1000)
    others = [tmp_path / ".loraq-tmp-other.gguf.0123456789ab", tmp_path / ".loraq-tmp-sql.gguf.x.0123456789ab"]
    for path in others:  # another target's: not this export's to clear
        path.write_bytes(b"someone else's")
    result = loraq("export", "sql", "--to", "gguf", str(tmp_path / "sql.gguf"), cwd=project)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["sql.gguf", *(p.name for p in others)])


# ---------------------------------------------------------------- reads outside the roots that leak content


def test_an_init_from_config_symlinked_out_of_the_roots_is_refused_unread(project: Path, secret: Path) -> None:
    warm = project / "warm" / "linked"
    shutil.copytree(project / ".loraq" / "adapters" / "sql", warm)
    (warm / "adapter_config.json").unlink()
    (warm / "adapter_config.json").symlink_to(secret)
    outside = secret.parent / "weights.safetensors"  # variant: the weights lead out (a real adapter's, elsewhere)
    shutil.copy(project / ".loraq" / "adapters" / "sql" / "adapter_model.safetensors", outside)
    weights = project / "warm" / "weights-linked"
    shutil.copytree(project / ".loraq" / "adapters" / "sql", weights)
    (weights / "adapter_model.safetensors").unlink()
    (weights / "adapter_model.safetensors").symlink_to(outside)
    queue = write_queue(project, DEFAULTS + """
jobs:
  - name: warm-config
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    init_from: ./warm/linked
  - name: warm-weights
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    init_from: ./warm/weights-linked
""", name="warm-linked.yaml")
    result = loraq("submit", str(queue), "--dry-run", cwd=project)
    assert result.returncode == 1, result.stdout
    no_secret(result)
    refused = [line for line in result.stderr.splitlines() if "outside the allowed roots" in line]
    assert any("job 'warm-config'" in line and "adapter_config.json" in line for line in refused), result.stderr
    assert any("job 'warm-weights'" in line and "adapter_model.safetensors" in line for line in refused), result.stderr


def test_an_export_base_whose_files_lead_out_of_the_roots_is_refused_unread(project: Path, secret: Path) -> None:
    evil = project / "models" / "evil"
    shutil.copytree(project / "models" / "tiny", evil)
    (evil / "config.json").unlink()
    (evil / "config.json").symlink_to(secret)  # the example
    sneaky = project / "models" / "sneaky"
    shutil.copytree(project / "models" / "tiny", sneaky)
    (sneaky / "tokenizer_config.json").unlink()
    (sneaky / "tokenizer_config.json").symlink_to(secret)  # variant: another file of the base
    try:
        for base, kind, dest in (("./models/evil", "gguf", "e.gguf"), ("./models/evil", "merged", "e-merged"),
                                 ("./models/sneaky", "merged", "s-merged")):
            result = loraq("export", "sql", "--to", kind, dest, "--base", base, cwd=project)
            assert result.returncode == 1 and len(lines(result)) == 1, result.stderr
            assert "outside the allowed roots" in result.stderr, result.stderr
            no_secret(result)
            assert not (project / dest).exists()
        # variant: an adapter folder whose adapter_config.json (where the base is named) leads out
        folder = project / "linked-adapter"
        shutil.copytree(project / ".loraq" / "adapters" / "sql", folder)
        (folder / "adapter_config.json").unlink()
        (folder / "adapter_config.json").symlink_to(secret)
        (folder / "loraq-manifest.json").unlink()
        result = loraq("export", "./linked-adapter", "--to", "gguf", "l.gguf", cwd=project)
        assert result.returncode == 1 and "outside the allowed roots" in result.stderr, result.stderr
        no_secret(result)
    finally:
        for path in (evil, sneaky, project / "linked-adapter"):
            shutil.rmtree(path, ignore_errors=True)


def test_the_merged_export_loads_the_adapter_bytes_it_checked(project: Path, secret: Path, tmp_path: Path) -> None:
    """Variant, a layer down: a weights file swapped for a link out of the roots after the inspection is never loaded.

    The api inspects first (a symlink is refused there); the exporter itself must not trust a name
    either: PEFT loads a private copy of what was read from checked descriptors.
    """
    from loraq.errors import ExportError
    from loraq.export import merged
    from loraq.workspace import Home

    swapped = adapters.copy(project / ".loraq" / "adapters" / "sql", tmp_path / "swapped")
    outside = secret.parent / "other.safetensors"
    shutil.copy(swapped / "adapter_model.safetensors", outside)
    (swapped / "adapter_model.safetensors").unlink()
    (swapped / "adapter_model.safetensors").symlink_to(outside)  # as if swapped after the inspection
    roots = Home(project / ".loraq").roots(queue_dir=project).with_read(tmp_path)
    with pytest.raises(ExportError, match="adapter_model.safetensors.*outside the allowed roots"):
        merged.export_merged(swapped, project / "models" / "tiny", tmp_path / "out", roots=roots)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swapped"]


# ---------------------------------------------------------------- wrong verdicts


def test_a_merged_export_ships_the_jobs_chat_template_and_checks_with_it(project: Path) -> None:
    """The job trained with chatml: the merged model ships chatml, and its logit check rendered the rows with it.

    Also: it replaces an earlier merged export (--force), clears a killed export's leftover,
    and never touches the network, run by a user without HF_HUB_OFFLINE.
    """
    from transformers import AutoTokenizer

    from loraq import data

    out = project / "exports" / "chat"
    out.mkdir(parents=True)
    (out / "loraq-export.json").write_text(json.dumps({"loraq_export": 1, "kind": "merged"}))
    (out / "old-shard.safetensors").write_bytes(b"old")
    leftover = project / "exports" / ".loraq-tmp-chat.00112233aabb"
    leftover.mkdir()
    result = loraq_offline_unset("export", "chat", "--to", "merged", "exports/chat", "--force", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "NETWORK ATTEMPT" not in result.stderr
    check = json.loads(result.stdout)["check"]
    chatml = (project / ".loraq" / "adapters" / "chat" / "chat_template.jinja").read_text()
    base_tokenizer = AutoTokenizer.from_pretrained(project / "models" / "tiny")
    assert base_tokenizer.chat_template and chatml != base_tokenizer.chat_template
    shipped = AutoTokenizer.from_pretrained(out)
    assert shipped.chat_template == chatml
    assert not (out / "old-shard.safetensors").exists() and json.loads((out / "loraq-export.json").read_text())[
        "chat_template"] == "the job's"
    assert sorted(p.name for p in (project / "exports").iterdir()) == ["chat"]
    # The check's rows are the job's own, rendered with chatml (as the trainer rendered them), not the base's template.
    rows = data.load_dataset(project / "data" / "support.jsonl").rows[:4]
    with_chatml = sum(len(data.encode(row, "chat", shipped, 128, chatml).input_ids) for row in rows)
    with_base = sum(len(data.encode(row, "chat", base_tokenizer, 128).input_ids) for row in rows)
    assert check["rows"] == 4 and check["tokens"] == with_chatml != with_base


def test_a_merged_export_refuses_a_chat_template_that_is_not_the_jobs(project: Path) -> None:
    """Variant: the template beside the adapter was edited, or lost, after training: never shipped as the job's."""
    edited = adapters.copy(project / ".loraq" / "adapters" / "chat", project / "chat-edited")
    (edited / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    lost = adapters.copy(project / ".loraq" / "adapters" / "chat", project / "chat-lost")
    (lost / "chat_template.jinja").unlink()
    try:
        for folder, why in ((edited, "is not the chat template the job trained with"), (lost, "is missing")):
            result = loraq("export", f"./{folder.name}", "--to", "merged", f"{folder.name}-merged", cwd=project)
            assert result.returncode == 1 and len(lines(result)) == 1, result.stderr
            assert f"{folder.name}: chat_template.jinja {why}" in result.stderr, result.stderr
            assert not (project / f"{folder.name}-merged").exists()
    finally:
        shutil.rmtree(edited)
        shutil.rmtree(lost)


def test_a_gguf_export_refuses_lora_shapes_that_do_not_fit_the_base(project: Path) -> None:
    dims = dict(adapters.TINY_LINEAR)
    dims["self_attn.q_proj"] = (72, 64)  # the example: lora_A is (r, 72), the base's q_proj takes 64 features
    adapters.synthetic(project / "misfit" / "a", dims=dims)
    # variant: every module made for a wider model (lora_A and lora_B both off)
    wide = {k: (n_in * 2, n_out * 2) for k, (n_in, n_out) in adapters.TINY_LINEAR.items()}
    adapters.synthetic(project / "misfit" / "wide", dims=wide, suffixes=("self_attn.v_proj",))
    try:
        for name, module in (("a", "q_proj"), ("wide", "v_proj")):
            result = loraq("export", f"./misfit/{name}", "--to", "gguf", f"misfit/{name}.gguf", "--base",
                           "./models/tiny", cwd=project)
            assert result.returncode == 1 and len(lines(result)) == 1, result.stderr
            assert f"self_attn.{module}: lora_A" in result.stderr and "do not fit the base's weight" in result.stderr
            assert "checked" not in result.stdout
            assert not (project / "misfit" / f"{name}.gguf").exists()
    finally:
        shutil.rmtree(project / "misfit")


def test_a_warm_start_from_a_nan_or_inf_adapter_is_refused_at_submit(project: Path) -> None:
    published = project / ".loraq" / "adapters" / "sql"
    names = adapters.lora_names(published / "adapter_model.safetensors", "lora_B")
    a_names = adapters.lora_names(published / "adapter_model.safetensors", "lora_A")
    poisoned = {"nan": (names[3], np.nan), "inf": (a_names[5], np.inf)}  # the example, and +Inf in a lora_A
    for folder, (tensor, value) in poisoned.items():
        path = shutil.copytree(published, project / "warm" / folder) / "adapter_model.safetensors"

        def poison(values: np.ndarray, value: float = value) -> None:
            values[7] = value

        adapters.set_values(path, tensor, poison)
    queue = write_queue(project, DEFAULTS + """
jobs:
  - name: from-nan
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    init_from: ./warm/nan
  - name: from-inf
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    init_from: ./warm/inf
""", name="warm-nan.yaml")
    try:
        result = loraq("submit", str(queue), cwd=project)
        assert result.returncode == 1, result.stdout
        for job, (tensor, _) in zip(("from-nan", "from-inf"), poisoned.values(), strict=True):
            line = next(line for line in result.stderr.splitlines() if f"job {job!r}" in line)
            assert "adapter_model.safetensors" in line and repr(tensor) in line and "NaN or Inf" in line, line
        status = json.loads(loraq("status", "--json", cwd=project).stdout)
        assert {j["name"] for j in status["jobs"]} == {"chat", "sql"}  # nothing enqueued
    finally:
        for folder in poisoned:
            shutil.rmtree(project / "warm" / folder)


@pytest.mark.parametrize("kind, dest", [("gguf", "hub.gguf"), ("merged", "hub-merged")])
def test_a_hub_base_not_in_the_cache_is_one_line_and_no_network(project: Path, kind: str, dest: str) -> None:
    result = loraq_offline_unset("export", "sql", "--to", kind, dest, "--base", "no-such-org/no-such-model",
                                 cwd=project)
    assert result.returncode == 1, result.stderr
    assert "NETWORK ATTEMPT" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("loraq: base model 'no-such-org/no-such-model' is not "
                                                            "in the local Hugging Face cache")
    assert "offline-only" in result.stderr and len(lines(result)) == 1
    assert not (project / dest).exists()


def test_an_adapter_naming_an_uncached_hub_base_is_one_line_and_no_network(project: Path) -> None:
    """Variant: no --base; the base is the hub id the adapter's own config names."""
    folder = adapters.copy(project / ".loraq" / "adapters" / "sql", project / "hub-named")
    (folder / "loraq-manifest.json").unlink()
    adapters.edit_config(folder, base_model_name_or_path="no-such-org/named-base")
    try:
        result = loraq_offline_unset("export", "./hub-named", "--to", "gguf", "named.gguf", cwd=project)
        assert result.returncode == 1 and "NETWORK ATTEMPT" not in result.stderr, result.stderr
        assert "'no-such-org/named-base' is not in the local Hugging Face cache" in result.stderr
        assert "offline-only" in result.stderr and len(lines(result)) == 1
    finally:
        shutil.rmtree(folder)


# ---------------------------------------------------------------- export by job name reads through the job's roots


def test_export_by_job_name_from_another_folder_reads_the_jobs_base(project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = project / ".loraq"
    result = loraq("export", "sql", "--to", "gguf", "sql.gguf", "--json", cwd=elsewhere, home=home)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["base_model"] == str((project / "models" / "tiny").resolve())
    assert (elsewhere / "sql.gguf").read_bytes()[:4] == b"GGUF"
    # The job's roots are the job's: a copy of its adapter, named by path, gets none of them.
    copy = shutil.copytree(home / "adapters" / "sql", elsewhere / "copy")
    result = loraq("export", str(copy), "--to", "gguf", "copy.gguf", cwd=elsewhere, home=home)
    assert result.returncode == 1 and "outside the allowed roots" in result.stderr, result.stderr
    assert not (elsewhere / "copy.gguf").exists()


def test_export_by_job_name_reads_a_base_the_submit_allowed_with_allow_root(project: Path, tmp_path: Path) -> None:
    """Variant: the base is in neither the queue's folder nor the home, but in a root the operator allowed at submit."""
    base = shutil.copytree(project / "models" / "tiny", tmp_path / "bases" / "tiny")
    work = tmp_path / "queue"
    (work / "data").mkdir(parents=True)
    shutil.copy(project / "data" / "sql.jsonl", work / "data" / "sql.jsonl")
    queue = write_queue(work, DEFAULTS.replace("./models/tiny", str(base)) + """
jobs:
  - name: allowed
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
""")
    home = tmp_path / "home"
    for command in (["--allow-root", str(base.parent), "submit", str(queue)], ["run", "-q"]):
        result = loraq(*command, cwd=work, home=home)
        assert result.returncode == 0, result.stdout + result.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = loraq("export", "allowed", "--to", "gguf", "allowed.gguf", cwd=elsewhere, home=home)
    assert result.returncode == 0, result.stderr
    assert (elsewhere / "allowed.gguf").read_bytes()[:4] == b"GGUF"
