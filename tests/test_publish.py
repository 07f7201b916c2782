"""Reading back what was published: manifests and inspections, whole or damaged."""

from __future__ import annotations

import json
from pathlib import Path

from loraq.supervisor import publish


def test_read_inspection_tolerates_a_missing_or_damaged_file(tmp_path: Path) -> None:
    assert publish.read_inspection(tmp_path) is None
    (tmp_path / publish.INSPECTION).write_text("{ cut off")
    assert publish.read_inspection(tmp_path) is None
    (tmp_path / publish.INSPECTION).write_text("[1, 2]")
    assert publish.read_inspection(tmp_path) is None
    (tmp_path / publish.INSPECTION).write_text(json.dumps({"passed": True, "findings": []}))
    assert publish.read_inspection(tmp_path) == {"passed": True, "findings": []}


def test_a_recovered_result_carries_the_manifest_losses_and_the_inspection(tmp_path: Path) -> None:
    (tmp_path / publish.INSPECTION).write_text(json.dumps({"passed": True, "findings": []}))
    manifest = {"job_id": 7, "attempt": 2, "train_loss": 1.5, "eval_loss": 1.25, "base_eval_loss": 3.0, "steps": 40}
    assert publish.recovered_result(tmp_path, manifest) == {
        "train_loss": 1.5, "eval_loss": 1.25, "base_eval_loss": 3.0, "steps": 40, "adapter": str(tmp_path),
        "recovered": True, "published_by_attempt": 2, "inspection": {"passed": True, "findings": []}}
