"""Atomic writes and publishing: a reader sees the old content or the new, never a mix."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from loraq import fsutil


def test_atomic_write_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    fsutil.atomic_write_json(target, {"v": 1})
    fsutil.atomic_write_json(target, {"v": 2})
    assert target.read_text() == '{\n  "v": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


class FailAt(fsutil.FileOps):
    """Fails the k-th durable-write call (of any kind) with ``err``."""

    def __init__(self, k: int, err: int = errno.EIO) -> None:
        self.k, self.err, self.calls = k, err, 0

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self.k:
            raise OSError(self.err, os.strerror(self.err))

    def write(self, fd: int, data: bytes) -> int:
        self._tick()
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._tick()
        super().fsync(fd)

    def replace(self, src: Path, dst: Path) -> None:
        self._tick()
        super().replace(src, dst)

    def rename(self, src: Path, dst: Path) -> None:
        self._tick()
        super().rename(src, dst)


@pytest.mark.parametrize("k", range(1, 6))
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_a_failed_write_leaves_the_old_content(tmp_path: Path, k: int, err: int) -> None:
    target = tmp_path / "report.json"
    fsutil.atomic_write_bytes(target, b"old" * 1000)
    ops = FailAt(k, err)
    with fsutil.use_ops(ops):
        try:
            fsutil.atomic_write_bytes(target, b"new" * 1000)
            wrote = True
        except OSError as exc:
            assert exc.errno == err
            wrote = False
    content = target.read_bytes()
    assert content in (b"old" * 1000, b"new" * 1000)
    if not wrote:
        # the failure came before the replace, or at the folder fsync after it
        assert content == b"old" * 1000 or ops.calls >= 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(fsutil.TMP_PREFIX)]


def test_publish_dir_is_one_rename_and_never_merges(tmp_path: Path) -> None:
    staging = tmp_path / "jobs" / "staging"
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"x")
    target = tmp_path / "adapters" / "a"
    fsutil.publish_dir(staging, target)
    assert (target / "adapter_model.safetensors").read_bytes() == b"x"
    assert not staging.exists()
    other = tmp_path / "jobs" / "other"
    other.mkdir()
    (other / "adapter_model.safetensors").write_bytes(b"y")
    with pytest.raises(OSError):
        fsutil.publish_dir(other, target)
    assert (target / "adapter_model.safetensors").read_bytes() == b"x"


def test_building_dir_appears_whole_and_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with fsutil.building_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"1")
        (tmp / "sub" / "b.json").write_bytes(b"{}")
        assert not target.exists()  # nothing is visible before the block ends
        fsutil.fsync_tree(tmp)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == ["a.bin", "sub/b.json"]
    with fsutil.building_dir(target) as tmp:
        (tmp / "c.bin").write_bytes(b"2")
        fsutil.fsync_tree(tmp)
    assert [p.name for p in target.iterdir()] == ["c.bin"]  # replaced, never merged
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_building_dir_that_fails_leaves_the_old_folder_and_no_trace(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with pytest.raises(ValueError):
        with fsutil.building_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"new")
            raise ValueError("cut short")
    assert [p.name for p in target.iterdir()] == ["old.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with pytest.raises(OSError):  # the rename fails: the old folder is put back
        with fsutil.use_ops(FailAt(2)):  # call 1 moves the old folder aside, call 2 is the rename
            with fsutil.building_dir(target) as tmp:
                (tmp / "new.bin").write_bytes(b"new")
    assert [p.name for p in target.iterdir()] == ["old.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_remove_tree_and_stale_tmp(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    fsutil.remove_tree(tmp_path / "d")
    (tmp_path / f"{fsutil.TMP_PREFIX}x").write_text("left by a kill")
    assert len(fsutil.remove_stale_tmp(tmp_path)) == 1
    assert list(tmp_path.iterdir()) == []


def test_writing_file_puts_a_librarys_file_in_place_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out" / "model.gguf"
    with fsutil.writing_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(fsutil.TMP_PREFIX)
        tmp.write_bytes(b"new")
        tmp.chmod(0o600)  # as a library may create it
        assert not target.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o666 & ~umask

    for failing in ("block", "check"):
        def check(failing: str = failing) -> None:
            if failing == "check":
                raise RuntimeError("not replaceable")

        with pytest.raises(RuntimeError), fsutil.writing_file(target, before_replace=check) as tmp:
            tmp.write_bytes(b"newer")
            if failing == "block":
                raise RuntimeError("the library failed")
        assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["model.gguf"], failing
