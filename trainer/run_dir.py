"""What every run directory records about itself: resolved config, overrides, and a manifest."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.provenance import config_sources

_PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "tensorboard", "rich", "numpy")


def _git_state(repo: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def write_run_files(run_dir: Path, cfg: DictConfig, overrides: list[str], device: torch.device) -> None:
    """config.yaml (fully resolved), overrides.yaml, manifest.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    manifest = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "overrides": list(overrides),
        "sources": config_sources(cfg, overrides),  # values from an option's YAML, the recipe, the command line
        "seed": cfg.trainer.seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "python": platform.python_version(),
        "packages": versions,
        "git": _git_state(Path(__file__).resolve().parent.parent),
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
