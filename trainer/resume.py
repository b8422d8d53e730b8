"""What a resume may change: the checkpoint's stored config against the config that resumes it.

Every checkpoint holds the resolved config of the run that wrote it. A resume compares the two key by key:

- a change that breaks exactness (the task, the model, the optimizer's type, the seed, regularization that shapes
  the model or the param groups, precision, gradient transforms, the DDP strategy) is refused, every such key named,
  unless `trainer.resume_allow_changes=true` accepts them on purpose (a different optimizer type then starts from
  fresh optimizer state);
- a checkpoint of another task (`task._target_`) is refused always: its weights belong to another model;
- data that differ from the checkpoint's (the task's `data_fingerprint()`: sizes, for image folders the file list
  and the split) are refused the same way, unless `trainer.resume_allow_data_changes=true`;
- a change that is legitimate on resume (run length, intervals, the learning rate and other optimizer
  hyperparameters, the schedule, early stopping's patience, where the data lives, the device) is applied: the
  fresh optimizer's hyperparameters replace the ones stored in its state_dict, the schedule gets the new base LR
  and the new horizon, and the changes are recorded in the run's manifest.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch

from core.errors import ConfigError, UserError

# Keys that may change on resume (fnmatch patterns on the dotted key). Everything else breaks exactness.
LEGITIMATE = (
    "trainer.max_steps", "trainer.max_epochs", "trainer.*_interval", "trainer.keep_checkpoints", "trainer.pictures",
    "trainer.resume", "trainer.resume_allow_changes", "trainer.resume_allow_data_changes", "trainer.existing_run",
    "trainer.threads", "trainer.progress",
    "trainer.dry_run", "trainer.nonfinite", "trainer.max_nonfinite", "trainer.fp16_*", "trainer.device",
    "trainer.compile", "trainer.tf32", "trainer.deterministic", "trainer.grad_accum",
    "data.*", "optimizer.*", "schedule.*", "early_stop.*", "regularize.weight_decay", "expect.*", "monitor.*",
    "clip.*",
)
# ...except these, matched first.
BREAKING = ("*._target_", "optimizer._target_", "optimizer.*._target_", "clip.*._target_")
# Keys of the changes that still apply to a target whose type did not change (schedule, early stopping).
RETARGETABLE = ("schedule._target_", "early_stop._target_", "early_stop")
# Param-group entries an optimizer updates as it runs (not hyperparameters): never overwritten on resume.
RUNNING_GROUP_KEYS = {"initial_lr", "lookahead_step", "loss_ema"}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for every leaf; lists are leaves."""
    if isinstance(tree, Mapping):
        if not tree and prefix:
            return {prefix: {}}
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def config_changes(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} for every leaf that differs (missing on one side: None)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def is_legitimate(key: str) -> bool:
    if _matches(key, RETARGETABLE) or key.startswith("early_stop."):
        return True
    return _matches(key, LEGITIMATE) and not _matches(key, BREAKING)


def _fmt(value: Any) -> str:
    return "(absent)" if value is None else repr(value) if isinstance(value, str) else str(value)


def check_changes(old: Mapping, new: Mapping, source: str, allow: bool) -> dict[str, tuple[Any, Any]]:
    """The changes between a checkpoint's config and the resuming one; raises for a checkpoint of another task, and
    for changes that break exactness unless `allow`. Returns every change (legitimate and accepted)."""
    changes = config_changes(old, new)
    old_task, new_task = flatten(old).get("task._target_"), flatten(new).get("task._target_")
    if old_task != new_task:
        raise UserError(f"trainer.resume={source}: that checkpoint belongs to another task ({old_task}); this run "
                        f"is {new_task}. Resume a checkpoint of the same task, or start a fresh run without "
                        "trainer.resume.")
    breaking = {k: v for k, v in changes.items() if not is_legitimate(k)}
    if breaking and not allow:
        lines = "\n".join(f"  {k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in breaking.items())
        raise ConfigError(
            f"trainer.resume={source}: the checkpoint was written with a different config, and these changes break "
            f"an exact continuation (task, model, optimizer type, seed, data order):\n{lines}\n"
            "Resume with the checkpoint's values (its config.yaml), start a fresh run, or add "
            "trainer.resume_allow_changes=true to continue with the changes on purpose.")
    return changes


def check_data(old: Mapping | None, new: Mapping, source: str, allow: bool) -> dict[str, tuple[Any, Any]]:
    """The differences between the data fingerprint a checkpoint recorded (Task.data_fingerprint) and this run's, as
    {"data:<name>": (old, new)}; raises unless `allow`. A checkpoint without one (written before fingerprints) has
    nothing to compare."""
    if old is None:
        return {}
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    if changed and not allow:
        lines = "\n".join(f"  {k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changed.items())
        raise ConfigError(
            f"trainer.resume={source}: the checkpoint was written on other data than this run has, so the "
            "continuation would not be exact (another epoch length, sample order or validation split; one curve "
            f"would mix two data sets):\n{lines}\nResume with the data the run started with, start a fresh run, or "
            "add trainer.resume_allow_data_changes=true to continue on these data on purpose.")
    return {f"data:{k}": v for k, v in changed.items()}


def optimizer_type_changed(changes: Mapping[str, tuple[Any, Any]]) -> bool:
    return any(k == "optimizer._target_" or (k.startswith("optimizer.") and k.endswith("._target_")) for k in changes)


def group_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's param-group settings as the config built them (before any state is loaded)."""
    return [{k: v for k, v in g.items() if k != "params" and not isinstance(v, torch.Tensor)}
            for g in optimizer.param_groups]


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, fresh: list[dict[str, Any]]) -> list[str]:
    """After load_state_dict (which restores the old groups' lr, betas, weight decay...), put back the settings the
    new config asks for; entries the optimizer keeps as running state are left alone. Returns the keys changed."""
    changed: set[str] = set()
    for group, want in zip(optimizer.param_groups, fresh):
        for k, v in want.items():
            if k not in RUNNING_GROUP_KEYS and group.get(k) != v:
                group[k] = v
                changed.add(k)
    return sorted(changed)


def rebase_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float]) -> None:
    """The resumed LambdaLR keeps its step (and a stateful schedule's state) but takes the new config's base LRs; its
    functions already carry the new horizon. The LR of the next update follows from them at once."""
    scheduler.base_lrs = list(base_lrs)
    for group, base, fn in zip(scheduler.optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
