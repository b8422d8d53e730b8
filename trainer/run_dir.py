"""What every run directory records about itself: resolved config, overrides, and a manifest.

The manifest says who the run is: a `run_id` (also in every checkpoint), where it started (`start`: step 0, or the
checkpoint it was resumed from, by sha256, with a kept copy) and every later resume (`resumes`, with the config
changes applied). Replay reads it to start from the same bytes the original did.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core.provenance import config_sources
from trainer.checkpoint import keep_copy

_PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "tensorboard", "rich", "numpy")


def git_state(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def write_run_files(run_dir: Path, cfg: DictConfig, overrides: list[str], device: torch.device,
                    resumed: dict[str, Any] | None = None, continuing: bool = False) -> str:
    """config.yaml (fully resolved), overrides.yaml, manifest.json; returns the run's id.

    `resumed`: what Trainer.resume returned; `continuing`: the checkpoint lies in this run directory (the same run
    goes on), as opposed to a new run started from another run's checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    previous: dict[str, Any] = {}
    if continuing:  # an unreadable manifest: the run's identity starts anew
        with contextlib.suppress(OSError, json.JSONDecodeError):
            previous = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    run_id = previous.get("run_id") or uuid.uuid4().hex
    start = previous.get("start") or {"step": 0}
    resumes = list(previous.get("resumes", []))
    if resumed:
        ckpt = Path(resumed["checkpoint"])
        entry = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": resumed["step"], "checkpoint": str(ckpt),
                 "sha256": resumed["sha256"], "changes": resumed["changes"]}
        kept = run_dir / "checkpoints" / "resume-source.pt"  # the latest resume's source, safe from pruning
        if ckpt.resolve() != kept.resolve():
            keep_copy(ckpt, kept)
        entry["copy"] = os.path.relpath(kept, run_dir)
        if not continuing:  # a new run that starts from another run's checkpoint
            start_copy = run_dir / "checkpoints" / "start.pt"
            keep_copy(kept, start_copy)
            start = {k: entry[k] for k in ("step", "checkpoint", "sha256")}
            start.update(copy=os.path.relpath(start_copy, run_dir), run_id=resumed.get("run_id"))
        resumes.append(entry)
    manifest = {
        "run_id": run_id,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "overrides": list(overrides),
        "sources": config_sources(cfg, overrides),  # values from an option's YAML, the recipe, the command line
        "seed": cfg.trainer.seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "python": platform.python_version(),
        "packages": versions,
        "git": git_state(Path(__file__).resolve().parent.parent),
        "start": start,
        "resumes": resumes,
    }
    if previous.get("command") and previous.get("command") != manifest["command"]:
        manifest["first_command"] = previous.get("first_command", previous["command"])
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return run_id
