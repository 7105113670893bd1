"""`surge_hf.saving`: temporary folders removed on failure, full disks named, folders replaced atomically."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from surge_hf.saving import DiskFullError, removed_on_failure, replaced_atomically

TORCH_FULL_DISK = ("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file data/0: file "
                   "write failed")


def write_then_fail(staging: Path, error: BaseException, needed: int) -> None:
    with removed_on_failure(staging, what="checkpoint out/step_2", needed_bytes=lambda: needed,
                            fix="Resume.") as folder:
        folder.mkdir()
        (folder / "part").write_bytes(b"0" * 100)
        raise error


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   RuntimeError('IoError(Os { code: 28, message: "No space left on device" })'),
                                   RuntimeError(TORCH_FULL_DISK)])
def test_a_full_disk_is_named_with_the_space_needed_and_the_folder_removed(tmp_path, error):
    staging = tmp_path / ".step_2.tmp"
    with pytest.raises(DiskFullError, match=rf"^No space left on device while writing checkpoint out/step_2 \(in "
                                            rf"{staging}, now removed\): it needs about 953,674,316,406,250.0 MiB "
                                            r"free, and [\d,]+\.\d MiB are free there. Free some space or write to a "
                                            r"larger disk. Resume.$") as caught:
        write_then_fail(staging, error, needed=10**21)
    assert caught.value.errno == errno.ENOSPC and caught.value.__cause__ is error
    assert not staging.exists()


@pytest.mark.parametrize("error", [OSError(errno.EACCES, "Permission denied"), RuntimeError(TORCH_FULL_DISK),
                                   KeyboardInterrupt()])
def test_other_failures_propagate_and_remove_the_folder(tmp_path, error):
    staging = tmp_path / ".step_2.tmp"
    with pytest.raises(type(error)):  # a failed torch write with space to spare is not a full disk
        write_then_fail(staging, error, needed=1)
    assert not staging.exists()


def test_a_folder_replaced_atomically_is_the_old_one_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    (target / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError), replaced_atomically(target, what="the model", needed_bytes=lambda: 0) as new:
        (new / "config.json").write_text("new")
        raise RuntimeError("killed")
    assert (target / "config.json").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["model"]
    with replaced_atomically(target, what="the model", needed_bytes=lambda: 0) as new:
        (new / "config.json").write_text("new")
        assert (target / "config.json").read_text() == "old"
    assert {p.name: p.read_text() for p in target.iterdir()} == {"config.json": "new", "notes.txt": "mine"}
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_kill_between_the_two_renames_is_repaired_by_the_next_write(tmp_path):
    target = tmp_path / "model"
    replaced = tmp_path / ".model.replaced"
    replaced.mkdir()
    (replaced / "config.json").write_text("old")
    with replaced_atomically(target, what="the model", needed_bytes=lambda: 0) as new:
        assert (new / "config.json").read_text() == "old"
        (new / "weights").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights"]
    assert sorted(os.listdir(tmp_path)) == ["model"]
