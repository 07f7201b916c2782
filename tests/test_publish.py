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


def test_the_adapter_is_fsynced_before_the_store_is_locked_and_only_renamed_under_the_lock(tmp_path: Path) -> None:
    """Every other worker and 'loraq submit' wait on the write lock: no file fsyncs while it is held."""
    import sqlite3

    from loraq import fsutil
    from test_faults import INSPECTION, RESULT, setup_publish

    s = setup_publish(tmp_path)
    manifest = publish.build_manifest(s.claim, RESULT, s.staging)
    publish.stage_metadata(s.staging, manifest, INSPECTION)
    probe = sqlite3.connect(s.home.db_path, timeout=0, isolation_level=None)
    seen: list[bool] = []  # per fsync: was the store's write lock held?

    class Probe(fsutil.FileOps):
        def fsync(self, fd: int) -> None:
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
                seen.append(False)
            except sqlite3.OperationalError as exc:
                assert "locked" in str(exc)
                seen.append(True)
            super().fsync(fd)

    files = len(list(s.staging.iterdir()))
    with fsutil.use_ops(Probe()):
        publish.publish(s.store, s.home, s.claim, s.staging, RESULT)
    assert s.store.job(s.claim.job.id).status == "completed"
    assert seen.count(False) >= files  # each file, before the lock
    assert 1 <= seen.count(True) <= 2  # under it: only the folders the rename changed
    probe.close()
