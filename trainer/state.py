"""The run's state: what a checkpoint holds, how a resume loads it, and what a resume may change.

A resume compares the checkpoint's config with the resuming one key by key: changes that break an exact continuation
are refused unless allowed, legitimate ones (run length, hyperparameters, the schedule...) applied. See DESIGN.md.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from core.config import flatten
from core.errors import ConfigError, UserError
from core.log import print_warning
from core.rng import rng_state, set_rng_state, step_seed
from optim.param_groups import running_group_keys
from trainer.checkpoint import file_digest, load_checkpoint, resume_candidates

# Keys that may change on resume (fnmatch patterns on the dotted key), except BREAKING ones. RETARGETABLE: changes
# that still apply to a target whose type changed. An optimizer's running param-group entries are never overwritten
# on resume (optim/param_groups.running_group_keys).
LEGITIMATE = (
    "trainer.max_steps", "trainer.max_epochs", "trainer.*_interval", "trainer.keep_checkpoints", "trainer.pictures",
    "trainer.resume", "trainer.resume_allow_changes", "trainer.resume_allow_data_changes", "trainer.existing_run",
    "trainer.threads", "trainer.progress", "trainer.dry_run", "trainer.nonfinite", "trainer.max_nonfinite",
    "trainer.fp16_*", "trainer.device", "trainer.compile", "trainer.tf32", "trainer.deterministic",
    "trainer.grad_accum", "data.*", "optimizer.*", "schedule.*", "early_stop.*", "regularize.weight_decay", "expect.*",
    "monitor.*", "clip.*",
)
BREAKING = ("*._target_",)  # fnmatch * crosses dots: every _target_ at any depth
RETARGETABLE = ("schedule._target_", "early_stop", "early_stop.*", "average", "average.*")  # averaging: not training


def config_changes(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} for every leaf that differs (missing on one side: None)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _refused(source: str, why: str, diff: Mapping[str, tuple[Any, Any]], fix: str) -> ConfigError:
    def fmt(v: Any) -> str:
        return "(absent)" if v is None else repr(v) if isinstance(v, str) else str(v)

    lines = "\n".join(f"  {k}: {fmt(a)} -> {fmt(b)}" for k, (a, b) in diff.items())
    return ConfigError(f"trainer.resume={source}: {why}:\n{lines}\n{fix}")


def check_changes(old: Mapping, new: Mapping, source: str, allow: bool) -> dict[str, tuple[Any, Any]]:
    """Every change between a checkpoint's config and the resuming one; raises for another task, and for changes that
    break exactness unless `allow`."""
    changes = config_changes(old, new)
    if "task._target_" in changes:
        old_task, new_task = changes["task._target_"]
        raise UserError(f"trainer.resume={source}: that checkpoint belongs to another task ({old_task}); this "
                        f"run is {new_task}. Resume a checkpoint of the same task, or start a fresh run without "
                        "trainer.resume.")
    breaking = {k: v for k, v in changes.items()
                if not (_matches(k, RETARGETABLE) or (_matches(k, LEGITIMATE) and not _matches(k, BREAKING)))}
    if breaking and not allow:
        raise _refused(source, "the checkpoint was written with a different config, and these changes break an exact "
                       "continuation (task, model, optimizer type, seed, data order)", breaking,
                       "Resume with the checkpoint's values (its config.yaml), start a fresh run, or add "
                       "trainer.resume_allow_changes=true to continue with the changes on purpose.")
    return changes


def check_data(old: Mapping | None, new: Mapping, source: str, allow: bool) -> dict[str, tuple[Any, Any]]:
    """The checkpoint's data fingerprint against this run's, as {"data:<name>": (old, new)}; raises unless `allow`.
    A checkpoint without one has nothing to compare."""
    changed = {} if old is None else config_changes(old, new)
    if changed and not allow:
        raise _refused(source, "the checkpoint was written on other data than this run has, so the continuation would "
                       "not be exact (another epoch length, sample order or validation split; one curve would mix two "
                       "data sets)", changed, "Resume with the data the run started with, start a fresh run, or add "
                       "trainer.resume_allow_data_changes=true to continue on these data on purpose.")
    return {f"data:{k}": v for k, v in changed.items()}


class Clock:
    """Seconds of training and of the whole run: earlier sessions' (from the checkpoint) plus this session's, with
    the time spent `paused()` (evaluation, checkpoints, pictures, histograms) left out of training time."""

    def __init__(self) -> None:
        self.train_before = self.wall_before = self.excluded = 0.0
        self.started: float | None = None
        self.pausing = False

    def start(self) -> None:
        self.started, self.excluded = time.perf_counter(), 0.0

    def session(self) -> float:
        return 0.0 if self.started is None else time.perf_counter() - self.started

    def wall(self) -> float:
        return self.wall_before + self.session()

    def train(self) -> float:
        return self.train_before + self.session() - self.excluded

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if self.pausing:  # inside another pause: that one counts the time
            yield
            return
        start, self.pausing = time.perf_counter(), True
        try:
            yield
        finally:
            self.pausing = False
            self.excluded += time.perf_counter() - start


def state_dict(tr: Any) -> dict[str, Any]:
    """Everything a resume needs (of Trainer `tr`). Collective under DDP: every rank contributes its RNG state."""
    p, rng = tr.p, rng_state()
    return {
        "step": tr.step, "run_id": tr.run_id,
        "model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(), "scheduler": p.scheduler.state_dict(),
        "scaler": p.scaler.state_dict() if p.scaler else None, "transforms": p.transforms.state_dict(),
        "early_stop": p.early_stop.state_dict() if p.early_stop else None, "modes": tr.modes.state_dict(),
        "average": p.average.state_dict() if p.average else None,
        "rng": rng, "rng_ranks": p.dist.all_gather(rng),
        "loop": {"loss_sum": tr.loss_sum, "loss_count": tr.loss_count, "last_eval_step": tr.last_eval_step,
                 "last_metrics": dict(tr.last_metrics), "stop_reason": tr.stop_reason,
                 "train_time": tr.clock.train(), "wall_time": tr.clock.wall(), "skipped": dict(tr.guard.skipped)},
        "config": OmegaConf.to_container(p.cfg, resolve=True),
        "data": tr.data,
    }


def load_state_dict(tr: Any, state: dict[str, Any], changes: dict[str, tuple] | None = None) -> None:
    """Restore a checkpoint into Trainer `tr`. `changes` (config key -> (old, new)) are the resume's accepted config
    changes: hyperparameters and the schedule follow the new config; a new optimizer type starts from fresh state."""
    p, changes = tr.p, changes or {}
    # the param-group settings as this config built them, before load_state_dict restores the old ones
    fresh = [{k: v for k, v in g.items() if k != "params" and not isinstance(v, torch.Tensor)}
             for g in p.optimizer.param_groups]
    fresh_base_lrs = list(p.scheduler.base_lrs)
    p.model.load_state_dict(state["model"])
    tr.modes.load_state_dict(state.get("modes"))  # a schedule-free optimizer's y (optim/schedule_free.py)
    if any(k.startswith("optimizer.") and k.endswith("._target_") for k in changes):
        if p.dist.is_main:
            print_warning("the optimizer's type changed on resume: it starts from fresh optimizer state "
                          "(the model weights, the step and the schedule continue).")
    else:
        p.optimizer.load_state_dict(state["optimizer"])
    p.scheduler.load_state_dict(state["scheduler"])
    if changes:  # the new config's lr, betas, weight decay..., base LRs and horizon from here on
        running = running_group_keys(p.optimizer)
        for group, want in zip(p.optimizer.param_groups, fresh):
            group.update({k: v for k, v in want.items() if k not in running})
        p.scheduler.rebase(fresh_base_lrs)
    if p.scaler and state["scaler"]:
        p.scaler.load_state_dict(state["scaler"])
    p.transforms.load_state_dict(state["transforms"])
    if p.early_stop and state["early_stop"]:
        p.early_stop.load_state_dict(state["early_stop"])
    if p.average and state.get("average") and "average._target_" not in changes:  # else it starts here
        p.average.load_state_dict(state["average"])
    ranks = state["rng_ranks"]
    if len(ranks) == p.dist.world:
        set_rng_state(ranks[p.dist.rank])  # every rank continues its own dropout / augmentation stream
    else:
        set_rng_state(state["rng"])
        if p.dist.enabled:
            torch.manual_seed(step_seed(p.cfg.trainer.seed, state["step"] * 1_009 + p.dist.rank))
    tr.step = state["step"]
    loop = state["loop"]
    tr.loss_sum = loop["loss_sum"].to(p.device)
    tr.loss_count, tr.last_eval_step, tr.last_metrics = loop["loss_count"], loop["last_eval_step"], loop["last_metrics"]
    tr.clock.train_before, tr.clock.wall_before = loop["train_time"], loop["wall_time"]
    tr.guard.skipped.update(loop["skipped"])
    tr.guard.params_checked_at = tr.step
    if loop["stop_reason"] and p.early_stop and not any(k.split(".")[0] == "early_stop" for k in changes):
        tr.stop_reason = loop["stop_reason"]  # an early-stopped run stays stopped


def resume(tr: Any, path: str | Path) -> dict[str, Any]:
    """Load the newest readable checkpoint at `path` (a file, a run directory or its checkpoints folder) into Trainer
    `tr`, after checking its config against this run's. Returns checkpoint, sha256, step, run_id and changes."""
    p, unreadable = tr.p, []
    for ckpt in resume_candidates(path):
        try:
            state = load_checkpoint(ckpt, map_location=p.device, advice=False)
        except UserError as e:  # truncated or corrupt: fall back to the one before
            unreadable.append(str(e))
            continue
        if unreadable and p.dist.is_main:  # recovered: the run goes on from an older step
            print_warning(f"{' '.join(unreadable)} Resuming from the previous one, {ckpt.name} (step "
                          f"{state['step']}): the steps after it are trained again.")
        if "optimizer" not in state:
            raise UserError(f"trainer.resume={path}: {ckpt} holds only model weights (best.pt keeps the best "
                            "evaluation's weights), not a training state. Resume from a step-*.pt checkpoint "
                            "or a run directory.")
        if "schedule" not in state["scheduler"]:  # torch LambdaLR's state, from before kiln's own Scheduler
            raise UserError(f"trainer.resume={path}: {ckpt} was written by an earlier kiln (its schedule state is "
                            "torch's LambdaLR): this version cannot continue it. Start a fresh run, or resume with "
                            "the kiln that wrote it (the run's manifest.json names its git commit).")
        t, new = p.cfg.trainer, OmegaConf.to_container(p.cfg, resolve=True)
        changes = check_changes(state.get("config", {}), new, str(path), allow=t.resume_allow_changes)
        changes.update(check_data(state.get("data"), tr.data, str(path), allow=t.resume_allow_data_changes))
        tr.load_state_dict(state, changes)
        return {"checkpoint": ckpt, "sha256": file_digest(ckpt), "step": tr.step, "run_id": state.get("run_id"),
                "changes": {k: list(v) for k, v in changes.items() if not k.startswith("trainer.resume")}}
    raise UserError(f"trainer.resume={path}: no readable checkpoint there. " + " ".join(unreadable))
