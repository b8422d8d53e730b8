"""One run from a composed config: build -> (resume) -> fit -> final table. Used by train.py and the tests."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError, UserError
from core.log import NullLogger, RunLogger, print_error, print_warning
from trainer import distributed
from trainer.build import build
from trainer.checkpoint import CheckpointDir
from trainer.dry_run import dry_run
from trainer.loop import Trainer
from trainer.run_dir import write_run_files
from trainer.signals import Interrupted, stop_on_signals


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train as `cfg` says, writing everything into `run_dir`; returns the final metrics.

    A run directory belongs to one run: a resume continues the run whose checkpoint it loads (in its own directory
    or, from another run's checkpoint, in a fresh one), and a fresh start into a directory that holds another run
    is refused (trainer.existing_run=move_aside moves that run into previous_run_<n>/ first, and says so)."""
    with stop_on_signals() as stop:
        return _run(cfg, Path(run_dir), overrides, stop)


def _run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None, stop: SimpleNamespace) -> dict[str, Any]:
    resume = cfg.trainer.resume
    if resume == "auto":
        found = find_run_to_resume(cfg, run_dir)
        resume, run_dir = (found, found) if found else (None, run_dir)
    parts = build(cfg)
    try:
        continuing = resume is not None and _within(Path(resume), run_dir)
        if parts.dist.agree(parts.dist.is_main and not continuing and holds_run(run_dir)):
            if cfg.trainer.existing_run != "move_aside":
                raise ConfigError(
                    f"hydra.run.dir={run_dir} already holds a run ({_describe(run_dir)}); a fresh run there would mix "
                    f"with it. Continue it with trainer.resume={run_dir} (or trainer.resume=auto), pick another "
                    "hydra.run.dir, or add trainer.existing_run=move_aside to move the old run into "
                    f"{run_dir / 'previous_run_<n>'} first.")
            if parts.dist.is_main:
                moved = move_aside(run_dir)
                print_warning(f"hydra.run.dir={run_dir} held another run: moved the run that was there to {moved}")
        trainer = Trainer(parts, run_dir)
        resumed = trainer.resume(resume) if resume else None
        if parts.dist.is_main:
            if continuing:
                trainer.checkpoints.clear_debris()
                superseded = trainer.checkpoints.set_aside_after(trainer.step)
                if superseded:
                    print_warning(f"resumed from step {trainer.step}: the newer checkpoints "
                                  f"{', '.join(p.name for p in superseded)} no longer belong to this run's future; "
                                  f"moved to {trainer.checkpoints.root / 'superseded'}")
            trainer.run_id = write_run_files(run_dir, cfg, overrides or [], parts.device, resumed=resumed,
                                             continuing=continuing)
        log = (RunLogger(run_dir, trainer.total_steps, progress=cfg.trainer.progress, start_step=trainer.step)
               if parts.dist.is_main else NullLogger())
        try:
            n_params = sum(p.numel() for p in parts.model.parameters())
            log.info(f"run dir {run_dir} | device {parts.device} | {n_params:,} parameters | "
                     f"{trainer.total_steps} steps ({parts.sampler.steps_per_epoch} per epoch)"
                     + (f" | {parts.dist.world} ranks" if parts.dist.enabled else "")
                     + (f" | resumed from {resumed['checkpoint']} at step {trainer.step}" if resumed else ""))
            if resumed and resumed["changes"]:
                log.info("changed on resume: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in
                                                            resumed["changes"].items()))
            stop.trainer = trainer
            final = trainer.fit(log)
            stop.finished = True
            log.final_table(final)
        finally:
            log.close()
    finally:
        parts.batches.close()  # DataLoader workers end with the run
        distributed.teardown()
    return final


def _within(path: Path, run_dir: Path) -> bool:
    """Is `path` (a checkpoint, a checkpoints folder, or a run directory) part of `run_dir`?"""
    p, d = path.expanduser().resolve(), run_dir.resolve()
    return p == d or d in p.parents


def holds_run(run_dir: Path) -> bool:
    """A run lives here: it wrote a checkpoint or finished. (A process killed before its first checkpoint leaves
    only logs, which the next run in the directory replaces.)"""
    return bool(CheckpointDir(run_dir / "checkpoints").step_files()) or (run_dir / "final_metrics.json").is_file()


def _describe(run_dir: Path) -> str:
    steps = CheckpointDir(run_dir / "checkpoints").step_files()
    what = f"checkpoints up to {steps[-1].name}" if steps else "no checkpoint"
    return what + (", finished" if (run_dir / "final_metrics.json").is_file() else "")


def move_aside(run_dir: Path) -> Path:
    """Move what a run left in `run_dir` into `run_dir/previous_run_<n>/` (Hydra's own files for this invocation
    stay)."""
    n = 1
    while (run_dir / f"previous_run_{n}").exists():
        n += 1
    dest = run_dir / f"previous_run_{n}"
    dest.mkdir()
    for p in run_dir.iterdir():
        if p != dest and not p.name.startswith("previous_run_") and p.name != ".hydra" and p.suffix != ".log":
            shutil.move(str(p), dest / p.name)
    return dest


def _fingerprint(cfg: DictConfig | dict) -> dict:
    """The config that identifies a run for trainer.resume=auto: everything but the resume setting itself."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    data.get("trainer", {}).pop("resume", None)
    return data


def find_run_to_resume(cfg: DictConfig, run_dir: Path) -> Path | None:
    """trainer.resume=auto: this run directory itself if it holds a run of the same config, else the newest sibling
    run directory with the same config and a checkpoint. When a sibling is found, the fresh directory Hydra just made
    for this invocation is removed (if it holds only Hydra's files)."""
    want = _fingerprint(cfg)

    def same_run(d: Path) -> bool:
        return (d / "config.yaml").is_file() and bool(CheckpointDir(d / "checkpoints").step_files()) and \
            _fingerprint(OmegaConf.load(d / "config.yaml")) == want

    if run_dir.is_dir() and same_run(run_dir):
        return run_dir
    siblings = [d for d in run_dir.parent.glob("*") if d.is_dir() and not d.is_symlink() and d != run_dir]
    for d in sorted(siblings, key=lambda d: d.stat().st_mtime, reverse=True):
        if same_run(d):
            if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
                shutil.rmtree(run_dir, ignore_errors=True)
            return d
    return None


def main(cfg: DictConfig, run_dir: Path, overrides: list[str],
         check: Callable[[DictConfig], None] | None = None) -> dict[str, Any]:
    """run() for the command line: a UserError prints one paragraph and exits, no traceback
    (HYDRA_FULL_ERROR=1 shows it anyway)."""
    try:
        try:
            if check is not None:
                check(cfg)  # every config error at once, before data or device are touched (config.check)
            if cfg.trainer.dry_run:
                return dry_run(cfg)
            return run(cfg, run_dir, overrides)
        except KeyboardInterrupt:  # Ctrl-C before run() took the signals over
            raise Interrupted("stopped by SIGINT before training began: nothing was trained. Run the same command "
                              "again.") from None
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print_error(str(e))
        sys.exit(e.exit_code)
