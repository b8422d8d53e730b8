"""Checkpoints are atomic, pruned safely, and found again by trainer.resume."""

from __future__ import annotations

import os

import pytest
import torch

from core.errors import UserError
from trainer.checkpoint import CheckpointDir, atomic_save, load_checkpoint, resume_candidates


def newest(path):
    """The checkpoint trainer.resume=<path> tries first."""
    return resume_candidates(path)[0]


def test_interrupted_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def dies_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # the temporary file was removed


def test_keeps_the_newest_step_files_and_links_last(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=2)
    for step in (10, 20, 30):
        ckpts.save({"step": step}, step)
    assert [p.name for p in ckpts.step_files()] == ["step-00000020.pt", "step-00000030.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 30
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "step-00000030.pt")  # a link, not a copy
    keep_all = CheckpointDir(tmp_path / "all", keep=0)
    for step in (1, 2, 3):
        keep_all.save({"step": step}, step)
    assert len(keep_all.step_files()) == 3


def test_resume_path_from_run_dir_folder_or_file(tmp_path):
    ckpts = CheckpointDir(tmp_path / "checkpoints")
    ckpts.save({"step": 5}, 5)
    ckpts.save({"step": 9}, 9)
    assert newest(tmp_path).name == "step-00000009.pt"
    assert newest(tmp_path / "checkpoints").name == "step-00000009.pt"
    assert newest(tmp_path / "checkpoints" / "step-00000005.pt").name == "step-00000005.pt"
    with pytest.raises(UserError, match="no checkpoint found"):
        newest(tmp_path / "elsewhere")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "step-00000001.pt"
    bad.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        load_checkpoint(bad)
