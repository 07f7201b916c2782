"""A job's ``chat_template``: a base without a template takes a chat dataset, and the template travels.

The base is the demo's tiny model with its template removed (most base models ship
none). Submit checks the name or file (one line naming file, job and field), renders
the rows with it for the token statistics; the trainer renders with the text stored
at submit; the published folder carries ``chat_template.jinja`` and the manifest names
it; ``loraq inspect --data`` renders the rows with the folder's template.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import LORAQ, write_queue
from loraq.data import templates
from loraq.errors import TemplateError

QUEUE = """\
defaults:
  base_model: ./models/plain
  lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}}
  training: {{max_steps: 6, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 96, save_steps: 3, logging_steps: 1}}
  validation: {{split: 0.1}}
retry_backoff_s: 0
jobs:
  - name: support
    dataset: ./data/support.jsonl
{extra}
"""


def loraq(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LORAQ, "--home", str(home), *args], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture
def plain(tmp_path: Path, tiny_model: Path, demo_datasets: dict[str, Path]) -> Path:
    """A project whose base model has no chat template (the tiny demo base without its template)."""
    shutil.copytree(tiny_model, tmp_path / "models" / "plain")
    (tmp_path / "models" / "plain" / "chat_template.jinja").unlink()
    config = tmp_path / "models" / "plain" / "tokenizer_config.json"
    assert "chat_template" not in json.loads(config.read_text())
    (tmp_path / "data").mkdir()
    shutil.copy(demo_datasets["support"], tmp_path / "data" / "support.jsonl")
    return tmp_path


def test_the_plain_base_really_has_no_template(plain: Path) -> None:
    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(plain / "models" / "plain").chat_template


# ---------------------------------------------------------------- the loader


def test_a_builtin_name_loads_its_text() -> None:
    source = templates.load_chat_template("chatml", base_dir=Path("/nonexistent"), roots=None)
    assert source.text == templates.CHATML and source.path is None and len(source.sha256) == 64


def test_chatml_renders_the_chatml_turns() -> None:
    import jinja2

    text = jinja2.Environment().from_string(templates.CHATML).render(
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        add_generation_prompt=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"


def test_an_unknown_name_says_which_names_exist() -> None:
    with pytest.raises(TemplateError, match=r"'chatmll' is not a built-in chat template \(built-ins: chatml\)"):
        templates.load_chat_template("chatmll", base_dir=Path("."), roots=None)


def test_a_file_that_is_not_jinja_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n")
    with pytest.raises(TemplateError, match=r"bad.jinja: not a Jinja template: line \d"):
        templates.load_chat_template("bad.jinja", base_dir=tmp_path, roots=None)


def test_a_template_using_the_generation_tag_parses(tmp_path: Path) -> None:
    (tmp_path / "gen.jinja").write_text("{% for m in messages %}{% generation %}{{ m['content'] }}"
                                        "{% endgeneration %}{% endfor %}")
    assert templates.load_chat_template("gen.jinja", base_dir=tmp_path, roots=None).path == str(tmp_path / "gen.jinja")


# ---------------------------------------------------------------- submit


def submit(project: Path, extra: str = "", *, dry_run: bool = True) -> subprocess.CompletedProcess[str]:
    queue = write_queue(project, QUEUE.format(extra=extra))
    return loraq(project / ".loraq", "submit", str(queue), *(["--dry-run"] if dry_run else []), cwd=project)


def test_a_chat_dataset_on_a_base_without_a_template_names_the_field(plain: Path) -> None:
    result = submit(plain)
    assert result.returncode == 1
    line = next(ln for ln in result.stderr.splitlines() if "template_error" in ln)
    assert "job 'support': chat_template" in line and "has no chat template" in line and "chatml" in line


def test_chatml_on_a_plain_base_is_accepted_and_counted(plain: Path) -> None:
    result = submit(plain, "    chat_template: chatml")
    assert result.returncode == 0, result.stderr
    assert "chat template: chatml (the job's chat_template)" in result.stdout
    # the tiny tokenizer has no <|im_start|>: the markers are trained as text, and submit says so
    assert "the tokenizer has no <|im_start|> / <|im_end|> token(s)" in result.stdout


@pytest.mark.parametrize(("value", "message"), [
    ("chatmll", "'chatmll' is not a built-in chat template"),
    ("./nope.jinja", "chat template file not found"),
    ("/etc/hostname.jinja", "outside the allowed roots"),
])
def test_a_bad_template_is_one_line_naming_file_job_and_field(plain: Path, value: str, message: str) -> None:
    result = submit(plain, f"    chat_template: {value}")
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.splitlines() if "chat_template" in ln]
    assert len(lines) == 1, result.stderr
    assert "queue.yaml: job 'support': chat_template" in lines[0] and message in lines[0]


def test_a_template_file_outside_the_roots_through_a_symlink_is_refused(plain: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere") / "t.jinja"
    outside.write_text(templates.CHATML)
    (plain / "t.jinja").symlink_to(outside)
    result = submit(plain, "    chat_template: ./t.jinja")
    assert result.returncode == 1 and "outside the allowed roots" in result.stderr


def test_a_template_that_cannot_render_a_row_names_the_row_and_the_template(plain: Path) -> None:
    (plain / "strict.jinja").write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                                        "{{ raise_exception('no system turns') }}{% endif %}"
                                        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    result = submit(plain, "    chat_template: ./strict.jinja")
    assert result.returncode == 1
    line = next(ln for ln in result.stderr.splitlines() if "template_error" in ln)
    assert "job 'support'" in line and "support.jsonl:1" in line
    assert "chat_template './strict.jinja' rejects this conversation: no system turns" in line


# ---------------------------------------------------------------- train, publish, inspect


@pytest.mark.slow
def test_a_chat_job_on_a_plain_base_with_chatml_trains_and_its_adapter_carries_the_template(plain: Path) -> None:
    home = plain / ".loraq"
    submitted = submit(plain, "    chat_template: chatml", dry_run=False)
    assert submitted.returncode == 0, submitted.stderr
    ran = loraq(home, "run", "--devices", "cpu")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    job = json.loads(loraq(home, "show", "support", "--json").stdout)["job"]
    assert job["status"] == "completed" and job["attempts"] == 1
    assert job["eval_loss"] < job["base_eval_loss"]

    folder = home / "adapters" / "support"
    assert (folder / "chat_template.jinja").read_text() == templates.CHATML
    manifest = json.loads((folder / "loraq-manifest.json").read_text())
    assert manifest["chat_template"] == {"name": "chatml", "file": "chat_template.jinja", "source": None,
                                         "sha256": templates.TemplateSource("chatml", templates.CHATML).sha256}
    assert "chat_template.jinja" in (folder / "README.md").read_text()

    # inspect --data renders the chat rows with the folder's template: without it they cannot be rendered
    checked = loraq(home, "inspect", str(folder), "--base", str(plain / "models" / "plain"),
                    "--data", str(plain / "data" / "support.jsonl"), "--json", cwd=plain)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    stats = json.loads(checked.stdout)["stats"]
    assert stats["chat_template"]["file"] == "chat_template.jinja"
    assert stats["eval_loss"] < stats["base_eval_loss"]
    (folder / "chat_template.jinja").unlink()
    without = loraq(home, "inspect", str(folder), "--base", str(plain / "models" / "plain"),
                    "--data", str(plain / "data" / "support.jsonl"), cwd=plain)
    assert without.returncode == 2 and "set the job's chat_template" in without.stderr


@pytest.mark.slow
def test_a_template_file_is_stored_at_submit_and_published_as_it_was(plain: Path) -> None:
    own = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
           "{% if add_generation_prompt %}[assistant] {% endif %}")
    (plain / "tmpl").mkdir()
    (plain / "tmpl" / "own.jinja").write_text(own)
    home = plain / ".loraq"
    assert submit(plain, "    chat_template: ./tmpl/own.jinja", dry_run=False).returncode == 0
    (plain / "tmpl" / "own.jinja").write_text("{{ changed after submit }}")  # the job keeps what was checked
    ran = loraq(home, "run", "--devices", "cpu")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    folder = home / "adapters" / "support"
    assert (folder / "chat_template.jinja").read_text() == own
    manifest = json.loads((folder / "loraq-manifest.json").read_text())
    assert manifest["chat_template"]["name"] == "./tmpl/own.jinja"
    assert manifest["chat_template"]["source"] == str((plain / "tmpl" / "own.jinja").resolve())


def test_an_adapter_folder_whose_template_does_not_parse_fails_inspection(tmp_path: Path) -> None:
    import adapters as ad
    from loraq.inspect import inspect_adapter

    folder = ad.synthetic(tmp_path / "a")
    assert inspect_adapter(folder).passed
    (folder / "chat_template.jinja").write_text(templates.CHATML)
    assert inspect_adapter(folder).passed
    (folder / "chat_template.jinja").write_text("{% if %}")
    report = inspect_adapter(folder)
    assert [f.code for f in report.findings if f.severity == "error"] == ["bad_chat_template"]
