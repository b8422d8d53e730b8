"""Atomic checkpoints: write to a temporary file in the same folder, fsync, os.replace, then fsync the folder.

A reader never sees a half-written file: either the old checkpoint or the new one, and after the folder's fsync
the rename itself survives a power cut. Step checkpoints are `step-XXXXXXXX.pt`; `last.pt` is a hard link to the
newest one and `best.pt` holds the best evaluation (weights only: it cannot be resumed from). A process killed
mid-write leaves a `.step-....tmp` file behind; `CheckpointDir.clear_debris` removes it when the run continues.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError

_STEP_FILE = re.compile(r"step-(\d+)\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry lives in the folder's own data)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames are durable by other means
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: what identifies a checkpoint, wherever it lies."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def keep_copy(src: Path, dst: Path) -> None:
    """dst holds src's bytes from now on, whatever happens to src (a hard link where the file system allows; the
    rename is atomic, so a reader sees the old dst or the new one)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.keep")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


class CheckpointDir:
    """The checkpoints of one run: step files (the newest `keep` of them), last.pt and best.pt."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root, self.keep = Path(root), keep

    def step_files(self) -> list[Path]:
        files = [p for p in self.root.iterdir() if _STEP_FILE.search(p.name)] if self.root.is_dir() else []
        return sorted(files, key=lambda p: int(_STEP_FILE.search(p.name).group(1)))

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.root / f"step-{step:08d}.pt"
        atomic_save(state, path)
        keep_copy(path, self.root / "last.pt")
        if self.keep > 0:  # never deletes the file just written
            for old in self.step_files()[: -self.keep]:
                old.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict[str, Any]) -> None:
        atomic_save(state, self.root / "best.pt")

    def clear_debris(self) -> list[Path]:
        """Remove the temporary files of writes a killed process never finished; returns what was removed."""
        if not self.root.is_dir():
            return []
        debris = [p for p in self.root.iterdir() if p.name.startswith(".") and p.suffix in (".tmp", ".keep")]
        for p in debris:
            p.unlink(missing_ok=True)
        return debris

    def set_aside_after(self, step: int) -> list[Path]:
        """Move step files newer than `step` into `superseded/`: a run resumed from an older checkpoint of its own
        directory replaces that future, and the stale files must not be resumed from later."""
        newer = [p for p in self.step_files() if int(_STEP_FILE.search(p.name).group(1)) > step]
        if newer:
            (self.root / "superseded").mkdir(exist_ok=True)
            for p in newer:
                os.replace(p, self.root / "superseded" / p.name)
            last = self.step_files()
            if last:
                keep_copy(last[-1], self.root / "last.pt")
        return newer


def resume_candidates(path: str | os.PathLike) -> list[Path]:
    """Checkpoints to try for `trainer.resume`, newest first: a checkpoint file itself, or the step files of a run
    directory (or its checkpoints folder). The caller falls back along the list when one is unreadable."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    for folder in (p / "checkpoints", p):
        files = CheckpointDir(folder).step_files()
        if files:
            return files[::-1]
        if (folder / "last.pt").is_file():
            return [folder / "last.pt"]
    raise UserError(f"trainer.resume={path}: no checkpoint found there (looked for a .pt file, or step-*.pt / "
                    f"last.pt in {p / 'checkpoints'} and {p}). Pass a run directory that has checkpoints, or a "
                    "checkpoint file.")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", advice: bool = True) -> dict[str, Any]:
    """A kiln checkpoint; UserError for a file that cannot be read (with what to do, unless `advice` is False: the
    caller falls back to an earlier one itself)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or corrupt file
        raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}: {e})."
                        + (" It may be truncated; resume from an earlier step-*.pt in the same folder." if advice
                           else "")) from None
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"checkpoint {path} is not a kiln checkpoint (no training step in it).")
    return state

