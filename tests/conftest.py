"""Shared fixtures: a tiny base model built once per session, demo datasets, a home."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Before torch is imported: in-process training and generation in the tests do not spin their
# OpenMP threads on cores that the trainers beside them need (as executors.base.trainer_env does).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
LORAQ = str(Path(sys.executable).with_name("loraq"))


#: The modules that take longest (their module fixtures train whole queues), longest first:
#: under pytest-xdist they start first, so that no worker is left with one of them at the end.
HEAVY_FIRST = ("test_real.py", "test_crash.py", "ray", "test_real_preference.py", "test_after.py",
               "test_api_openai.py", "test_real_graders.py", "test_tracking.py", "test_export.py", "test_e2e.py",
               "test_notices.py", "test_controls_train.py", "test_chat_template.py", "test_packing.py",
               "test_cli_ops.py", "test_throughput.py", "test_real_shapes.py", "test_hostile_input.py",
               "test_hostile_export.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``): a module's tests run
    in one worker, so a module fixture (a trained queue) is built once, not once per worker; every
    test that starts a local Ray instance runs in one worker (two Ray instances on a 2-core machine
    would compete for the CPUs each is sized to, and for memory). The longest groups go first.
    Without xdist the marks do nothing and only the order changes."""
    def group(item: pytest.Item) -> str:
        return "ray" if item.get_closest_marker("ray") is not None else item.path.name

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: n for n, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(group(item), len(rank)))  # stable: collection order within a rank


class Clock:
    """A clock tests move by hand: lease and backoff logic runs instantly and exactly."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> Path:
    """``build(folder)`` once per test run: under pytest-xdist the first worker to get here builds it
    (a minute of pretraining for the tiny model) and the others wait, then share the folder."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, built = root / "shared" / name, root / "shared" / f"{name}.built"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not built.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died half-way
            build(folder)
            built.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny Llama (random init plus a short pretraining) with its tokenizer."""
    from loraq.demo import build_model

    return _built_once(tmp_path_factory, "tiny", lambda folder: build_model(folder, pretrain_steps=100))


@pytest.fixture(scope="session")
def real_model() -> Any:
    """The real pretrained base (SmolLM2-135M-Instruct): ``.folder`` (HF safetensors, float32) and ``.gguf``.

    Built once per machine into $LORAQ_CACHE (default ~/.cache/loraq) by tools/real_model.py
    (``make test`` builds it first). Where it cannot be had, every test that needs it FAILS
    with the tool's one line: CI must run the real tier, so it never skips by itself.
    Offline, leave the tier out: ``pytest -m "not real"``.
    """
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import real_model as tool
    finally:
        sys.path.remove(str(ROOT / "tools"))
    try:
        return tool.ensure()
    except tool.RealModelUnavailable as exc:
        pytest.fail(f"the real model is unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def shaped_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-init models of a real model's shape (tests/shapes.py): 150 k vocabulary, GQA, tied and untied."""
    import shapes

    root = tmp_path_factory.mktemp("shaped")
    return {name: shapes.build(root / name, name) for name in shapes.SHAPES}


@pytest.fixture(scope="session")
def demo_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import random

    from loraq import demo

    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(1)
    return {key: demo.write_jsonl(folder / name, make(120, rng)) for key, (name, make) in demo.DATASETS.items()}


@pytest.fixture
def workdir(tmp_path: Path, tiny_model: Path, demo_datasets: dict[str, Path]) -> Path:
    """A folder holding models/tiny and data/*.jsonl, as a user's project would."""
    (tmp_path / "models").mkdir()
    # A copy, not a symlink: a link leading out of the queue's folder is refused, as it should be.
    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    (tmp_path / "data").mkdir()
    for path in demo_datasets.values():
        shutil.copy(path, tmp_path / "data" / path.name)
    return tmp_path


def write_queue(folder: Path, body: str, name: str = "queue.yaml") -> Path:
    path = folder / name
    path.write_text(body, encoding="utf-8")
    return path


#: A queue of tiny jobs that train in seconds on the CPU.
TINY_DEFAULTS = """\
defaults:
  base_model: ./models/tiny
  lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}
  training: {max_steps: 6, learning_rate: 5.0e-3, batch_size: 8, max_seq_len: 64, save_steps: 3, logging_steps: 1, seed: 3}
  validation: {split: 0.1}
retry_backoff_s: 0
"""

#: Three tiny jobs, one per dataset format, with different LoRA settings.
THREE_JOBS = TINY_DEFAULTS + """
jobs:
  - name: chat-bot
    dataset: ./data/support.jsonl
  - name: sql-writer
    dataset: {path: ./data/sql.jsonl, format: prompt_completion}
    lora: {r: 8, alpha: 16}
  - name: stories
    dataset: ./data/stories.jsonl
    lora: {target_modules: all-linear}
"""
