"""Queue file validation: every error names the file, the job and the field; all are listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_DEFAULTS, write_queue
from loraq.errors import SpecError
from loraq.queue.spec import load_queue
from loraq.sandbox import Roots


def roots_for(folder: Path, *extra: Path) -> Roots:
    return Roots.of([folder, *extra])


def problems(folder: Path, body: str) -> list[str]:
    path = write_queue(folder, body)
    with pytest.raises(SpecError) as info:
        load_queue(path, roots_for(folder))
    return [str(p) for p in info.value.problems]


def test_valid_queue_merges_defaults_and_resolves_paths(workdir: Path) -> None:
    path = write_queue(workdir, TINY_DEFAULTS + """
jobs:
  - name: a
    dataset: ./data/support.jsonl
  - name: b
    dataset: {path: data/sql.jsonl, format: prompt_completion}
    lora: {r: 16}
    priority: 3
""")
    queue = load_queue(path, roots_for(workdir))
    a, b = queue.jobs
    assert a.spec.lora.r == 4 and b.spec.lora.r == 16
    assert b.spec.lora.alpha == 8  # merged from defaults under the override
    assert b.spec.dataset.format == "prompt_completion" and b.spec.priority == 3
    assert a.dataset_path == str((workdir / "data" / "support.jsonl").resolve())
    assert Path(a.base_model).is_absolute()
    assert a.spec.max_retries == 2
    assert queue.settings.retry_backoff_s == 0


@pytest.mark.parametrize(
    ("job_yaml", "expected"),
    [
        ("lora: {r: -1}", "job 'j': lora.r: Input should be greater than 0 (got -1)"),
        ("training: {learning_rate: .nan}", "job 'j': training.learning_rate"),
        ("training: {learning_rate: .inf}", "job 'j': training.learning_rate"),
        ("lora: {rank: 8}", "job 'j': lora.rank: unknown key"),
        ("epochs: 3", "job 'j': epochs: unknown key"),
        ("training: {batch_size: 0}", "job 'j': training.batch_size"),
        ("lora: {dropout: 1.5}", "job 'j': lora.dropout"),
        ("lora: {target_modules: some-linear}", "job 'j': lora.target_modules: must be 'all-linear' or a list"),
        ("validation: {split: 0}", "job 'j': validation: needs split > 0 or a dataset"),
        ("dataset: {path: ./data/support.jsonl, format: xml}", "job 'j': dataset.format"),
        ("max_retries: -1", "job 'j': max_retries"),
        # unknown keys are named whatever they are called (not mistaken for pydantic's union tags)
        ("lora: {intermediate: 3}", "job 'j': lora.intermediate: unknown key"),
        ("training: {floaty: 1}", "job 'j': training.floaty: unknown key"),
        ("lora: {none_of_these: 1}", "job 'j': lora.none_of_these: unknown key"),
        ("lora: {target_modules: [q_proj, 7]}", "job 'j': lora.target_modules"),
    ],
)
def test_bad_values_are_named(workdir: Path, job_yaml: str, expected: str) -> None:
    dataset = "" if job_yaml.startswith("dataset:") else "    dataset: ./data/support.jsonl\n"
    found = problems(workdir, TINY_DEFAULTS + f"jobs:\n  - name: j\n{dataset}    {job_yaml}\n")
    assert any(expected in p for p in found), found
    assert all(p.startswith(str(workdir / "queue.yaml")) for p in found)


@pytest.mark.parametrize("name", [".hidden", "has space", "slash/name", "", "x" * 101, "semi;colon"])
def test_bad_names_are_refused(workdir: Path, name: str) -> None:
    found = problems(workdir, TINY_DEFAULTS + f"jobs:\n  - name: {name!r}\n    dataset: ./data/support.jsonl\n")
    assert any("name" in p for p in found), found


def test_duplicate_names_are_refused(workdir: Path) -> None:
    found = problems(workdir, TINY_DEFAULTS + """
jobs:
  - {name: twin, dataset: ./data/support.jsonl}
  - {name: twin, dataset: ./data/sql.jsonl}
""")
    assert any("job 'twin': name: duplicate name (also job #1)" in p for p in found), found


def test_every_problem_is_listed_at_once(workdir: Path) -> None:
    found = problems(workdir, TINY_DEFAULTS + """
jobs:
  - {name: one, dataset: ./data/support.jsonl, lora: {r: 0}}
  - {name: two, dataset: ./data/missing.jsonl}
  - {name: three, dataset: ./data/sql.jsonl, bogus: 1}
""")
    assert len(found) == 3
    assert any("job 'one': lora.r" in p for p in found)
    assert any("job 'two': dataset.path: file not found" in p for p in found)
    assert any("job 'three': bogus: unknown key" in p for p in found)


def test_paths_outside_the_roots_are_refused(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "secret.jsonl").write_text('{"text": "x"}\n')
    found = problems(workdir, TINY_DEFAULTS + f"jobs:\n  - name: j\n    dataset: {outside / 'secret.jsonl'}\n")
    assert any("dataset.path" in p and "outside the allowed roots" in p for p in found), found


def test_a_symlink_cannot_lead_out_of_the_roots(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere2")
    (outside / "secret.jsonl").write_text('{"text": "x"}\n')
    (workdir / "data" / "link.jsonl").symlink_to(outside / "secret.jsonl")
    found = problems(workdir, TINY_DEFAULTS + "jobs:\n  - name: j\n    dataset: ./data/link.jsonl\n")
    assert any("outside the allowed roots" in p for p in found), found


def test_a_sibling_with_a_common_prefix_is_not_inside(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data-evil").mkdir()
    roots = Roots.of([tmp_path / "data"])
    assert roots.contains(tmp_path / "data" / "x")
    assert not roots.contains(tmp_path / "data-evil" / "x")


def test_pickle_datasets_and_missing_models_are_refused(workdir: Path) -> None:
    (workdir / "data" / "rows.pt").write_bytes(b"\x80\x04.")
    found = problems(workdir, """
jobs:
  - {name: a, base_model: ./models/none, dataset: ./data/support.jsonl}
  - {name: b, base_model: ./models/tiny, dataset: ./data/rows.pt}
  - {name: c, base_model: "not a hub id!", dataset: ./data/support.jsonl}
""")
    assert any("job 'a': base_model: folder not found" in p for p in found), found
    assert any("job 'b': dataset.path: pickle files are refused" in p for p in found), found
    assert any("job 'c': base_model" in p and "neither a local folder" in p for p in found), found


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("jobs: [", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping with 'jobs'"),
        ("defaults: {}\n", "jobs: must be a non-empty list"),
        ("jobs: []\n", "jobs: must be a non-empty list"),
        ("jobs:\n  - {name: a, dataset: ./data/support.jsonl, base_model: ./models/tiny}\nwhatever: 1\n", "whatever: unknown key"),
        ("pause_after_failures: 0\njobs:\n  - {name: a, dataset: ./data/support.jsonl, base_model: ./models/tiny}\n", "pause_after_failures"),
    ],
)
def test_bad_files_are_named(workdir: Path, body: str, expected: str) -> None:
    found = problems(workdir, body)
    assert any(expected in p for p in found), found


def test_yaml_is_loaded_safely(workdir: Path) -> None:
    found = problems(workdir, "jobs: !!python/object/apply:os.system ['touch pwned']\n")
    assert any("not valid YAML" in p for p in found)
    assert not (workdir / "pwned").exists()


def test_missing_queue_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="queue file not found"):
        load_queue(tmp_path / "nope.yaml", roots_for(tmp_path))
