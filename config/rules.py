"""Rules across groups (each stated once), the construction of the parts that hold no data, and the oddities."""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig

from config.bind import Problems, construct, resolved, under
from core.batches import split_problem, usable_cores
from core.config import parse_duration
from core.messages import fmt
from core.protocol import interpolated_from, unreported
from optim.param_groups import config_param_groups
from optim.schedule_free import has_modes
from regularize.loss_reduction import REDUCTIONS
from regularize.weight_decay import coupled_weight_decay
from schedules.functions import decays
from schedules.horizon import Horizon, total_steps
from tasks.data import root_problems
from trainer.device import machine_problems, resolve_device


def get(cfg: DictConfig, key: str, p: Problems) -> Any:
    """The resolved value at `key` when it exists and has no problem; else None."""
    return None if under(p, key) else resolved(cfg, key)


def target(cfg: DictConfig, key: str, p: Problems) -> Any:
    """What `key._target_` names, or None."""
    name = get(cfg, f"{key}._target_", p)
    with contextlib.suppress(Exception):
        return get_object(name) if isinstance(name, str) else None
    return None


def task_settings(cfg: DictConfig, p: Problems) -> tuple[Any, dict]:
    """The task class and its resolved `task.*` keys over the constructor's defaults (what Task.check takes)."""
    node, cls = cfg.get("task"), target(cfg, "task", p)
    keys = [str(k) for k in node if not under(p, f"task.{k}")] if isinstance(node, DictConfig) else []
    task = {k: get(cfg, f"task.{k}", p) for k in keys}  # the keys with a problem take their defaults
    params = []
    with contextlib.suppress(TypeError, ValueError):  # no signature (a builtin): no defaults
        params = inspect.signature(cls).parameters.values() if inspect.isclass(cls) else []
    return cls, {**{q.name: q.default for q in params if q.default is not q.empty}, **task}


def horizon_numbers(cfg: DictConfig, p: Problems) -> tuple[int | None, int | None]:
    """(total steps, steps per epoch) as far as they are known without data (None where not)."""
    (cls, task), batch = task_settings(cfg, p), get(cfg, "task.batch_size", p)
    n = cls.train_size_of(task) if hasattr(cls, "train_size_of") else None
    spe = n // batch if n is not None and isinstance(batch, int) and 0 < batch <= n else None  # drop_last
    with contextlib.suppress(TypeError, ValueError):
        return total_steps(get(cfg, "trainer.max_steps", p), get(cfg, "trainer.max_epochs", p), spe), spe
    return None, spe


def metric_driven(cfg: DictConfig, p: Problems) -> tuple[str, str, Any] | None:
    """(what, the alternative, its target) for the part of the run that acts on evaluations (evaluations_to_act)."""
    if hasattr(stop := target(cfg, "early_stop", p), "evaluations_to_act"):
        return "early stopping", " or early_stop=off", stop
    if hasattr(schedule := target(cfg, "schedule", p), "evaluations_to_act"):
        return f"schedule={cfg.schedule._target_.rpartition('.')[2]}", "", schedule
    return None


def check_rules(cfg: DictConfig, p: Problems) -> None:
    add, (cls, task) = p.setdefault, task_settings(cfg, p)
    try:
        total_steps(get(cfg, "trainer.max_steps", p), get(cfg, "trainer.max_epochs", p), None)
    except ValueError as e:
        add("trainer.max_steps", str(e))
    for line in root_problems("data.root", get(cfg, "data.root", p)):
        add("data.root", line)
    for line in cls.check(task) if hasattr(cls, "check") else []:  # not again where a value comes from a bad key
        if not under(p, *interpolated_from(cfg, key := line.split("=")[0].split(":")[0])):
            add(key, line)
    batch, accum = get(cfg, "task.batch_size", p), get(cfg, "trainer.grad_accum", p)
    if isinstance(batch, int) and isinstance(accum, int) and batch > 0 and (line := split_problem(batch, accum)):
        add("trainer.grad_accum", line)
    n = cls.train_size_of(task) if hasattr(cls, "train_size_of") else None
    if n is not None and isinstance(batch, int) and batch > n:
        add("task.batch_size", f"task.batch_size={batch}: must be <= the training set ({n} samples)")
    if (reduction := get(cfg, "regularize.loss_reduction", p)) not in (None, *REDUCTIONS):
        add("regularize.loss_reduction",
            f"regularize.loss_reduction={fmt(reduction)}: must be one of {', '.join(REDUCTIONS)}")
    evals, needs = get(cfg, "trainer.eval_interval", p), metric_driven(cfg, p)
    if needs and evals is not None and parse_duration(evals)[0] == 0:
        add("trainer.eval_interval", f"trainer.eval_interval={fmt(evals)}: {needs[0]} needs evaluations during the "
                                     f"run (a non-zero interval){needs[1]}")
    if inspect.isclass(cls):
        check_task_fit(cfg, p, cls, task)
    resume = get(cfg, "trainer.resume", p)
    if isinstance(resume, str) and resume != "auto" and not (resume.strip() and Path(resume).expanduser().exists()):
        add("trainer.resume", f"trainer.resume={fmt(resume, 1000)}: "
                              f"{'no such file or folder' if resume.strip() else 'names no checkpoint'}; pass a run "
                              "folder that has checkpoints, a checkpoint file, trainer.resume=auto (the newest run "
                              "with the same config) or trainer.resume=null (a fresh run)")
    if isinstance(device := get(cfg, "trainer.device", p), str):
        for key, line in machine_problems(device, get(cfg, "trainer.compile", p) is True,
                                          get(cfg, "trainer.strategy", p)).items():
            add(key, line)


def check_task_fit(cfg: DictConfig, p: Problems, cls: type, task: dict) -> None:
    """The norm and the metrics the config names, against what the task class declares (no data loaded)."""
    name, kind, norms = f"{cls.__module__}.{cls.__qualname__}", get(cfg, "norm.kind", p), getattr(cls, "norms", None)
    if norms is not None and isinstance(kind, str) and kind not in norms:
        p.setdefault("norm.kind", f"norm.kind={fmt(kind)} (norm={kind}): the task {name} cannot use it; it takes "
                                  + ", ".join(f"norm={k}" for k in norms))
    batch, accum = get(cfg, "task.batch_size", p), get(cfg, "trainer.grad_accum", p)
    if kind == "batchnorm" and isinstance(accum, int) and batch == accum:
        p.setdefault("norm.kind", f"norm.kind='batchnorm' (norm=batchnorm) with micro-batches of 1 sample (task."
                                  f"batch_size={batch} / trainer.grad_accum={accum}): BatchNorm cannot normalise a "
                                  "single sample in training; use a larger task.batch_size, a smaller "
                                  "trainer.grad_accum, or norm=layernorm")
    evals, tests = cls.declared_metrics(task) if hasattr(cls, "declared_metrics") else ({}, {})
    for key in ("monitor.metric", "early_stop.monitor", "schedule.monitor", "expect.metric"):
        metric, mode_key = get(cfg, key, p), key.rsplit(".", 1)[0] + ".mode"
        if not evals or not isinstance(metric, str) or under(p, *interpolated_from(cfg, key)):
            continue
        line = unreported(cfg, key, metric, name, evals, tests, every_eval=key.endswith(".monitor"))
        mode, want = get(cfg, mode_key, p), {**evals, **tests}.get(metric)
        if line:
            p.setdefault(key, line)
        elif mode in ("min", "max") and mode != want and not under(p, *interpolated_from(cfg, mode_key)):
            via = "".join(f" (from ${{{r}}})" for r in interpolated_from(cfg, mode_key))
            p.setdefault(mode_key, f"{mode_key}={fmt(mode)}{via}: {'lower' if want == 'min' else 'higher'} {metric} "
                                   f"is better (the task {name} declares it), so {mode} would keep the worst value; "
                                   f"use {mode_key}={want}")


def check_construction(cfg: DictConfig, p: Problems) -> None:
    """Construct the parts that hold no data, so their own argument checks run before data loads."""
    total, spe = horizon_numbers(cfg, p)
    known = total is not None and (spe or "ep" not in str(get(cfg, "schedule", p)))
    # a run of unknown length: a horizon every duration fits, so only the schedule's other arguments are judged
    horizon = Horizon(total, spe or 1) if known else Horizon(10**12, 10**6)
    construct(cfg, "schedule", lambda made: made(horizon), p)
    for key in [*(f"clip.{name}" for name in get(cfg, "clip", p) or {}), "early_stop"]:
        construct(cfg, key, lambda made: made, p)
    construct(cfg, "average", lambda made: made(torch.nn.Linear(2, 2), horizon), p)
    if not under(p, "trainer.device"):  # fp16 needs a GPU: trainer/amp.py says so
        construct(cfg, "amp", lambda made: made.bind(resolve_device(get(cfg, "trainer.device", p) or "cpu")), p)
    construct(cfg, "norm", lambda made: made(4), p)
    # the trainer's param groups for a tiny model (hidden matrix, norm, head): some optimizers route by role
    toy = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    if not under(p, "regularize.decay_bias_and_norm", "regularize.decay_embeddings"):
        construct(cfg, "optimizer", lambda made: coupled(made(config_param_groups(toy, cfg.regularize)), cfg, p), p)
    construct(cfg, "regularize.augment", augment, p)


def coupled(optimizer: Any, cfg: DictConfig, p: Problems) -> None:
    """regularize.weight_decay_mode=coupled needs an optimizer with weight decay (regularize/weight_decay.py)."""
    try:
        if not under(p, "regularize.weight_decay_mode", "regularize.weight_decay"):
            coupled_weight_decay(optimizer, cfg.regularize.weight_decay_mode, cfg.regularize.weight_decay)
    except ValueError as e:  # the optimizer is fine: the rule is regularize's
        p.setdefault("regularize.weight_decay_mode", str(e))


def augment(factory: Any) -> Any:
    """Call the augmentation factory as a task does; one that needs task facts (vocab size) is left alone."""
    try:
        return factory()
    except TypeError as e:
        if "missing" not in str(e):
            raise


def oddities(cfg: DictConfig) -> list[str]:
    """Settings that run but probably do not do what was meant (warnings, one line each)."""
    p, lines = {}, []
    (total, spe), evals, needs = horizon_numbers(cfg, p), get(cfg, "trainer.eval_interval", p), metric_driven(cfg, p)
    every = Horizon(total, spe or 1).steps(evals) if total and (spe or "ep" not in str(evals)) else None
    if every and every > total and not needs:
        lines.append(f"trainer.eval_interval={fmt(evals)} is {every} steps, longer than the run ({total} steps): "
                     "the only evaluation is the final one (trainer.eval_interval=0 says so without this warning)")
    if every and needs:
        key, effect = (("early_stop.patience", "early stopping can never stop it") if needs[0] == "early stopping"
                       else ("schedule.patience", "reduce-on-plateau can never lower the learning rate"))
        evaluations, patience = (total - 1) // every, get(cfg, key, p)  # the last evaluation decides nothing
        needed = needs[2].evaluations_to_act(patience) if isinstance(patience, int) else 1
        if evaluations == 0:
            length = "the whole run" if every == total else f"longer than the run ({total} steps)"
            lines.append(f"trainer.eval_interval={fmt(evals)} is {every} steps, {length}: the run does not evaluate "
                         f"before its end, so {effect}; use a shorter interval")
        elif evaluations < needed:
            lines.append(f"{key}={patience}: the run evaluates {evaluations} time{'s' * (evaluations != 1)} before "
                         f"its end (every {every} of {total} steps), so {effect} (that takes {needed}); evaluate more "
                         f"often (trainer.eval_interval) or lower {key}")
    threads, cores = get(cfg, "trainer.threads", p), usable_cores()
    if isinstance(threads, int) and threads > cores:
        lines.append(f"trainer.threads={threads}: this machine has {cores} core{'s' * (cores > 1)} for this process; "
                     "more threads than cores slow torch down; use trainer.threads=null (torch's default) or at most "
                     f"{cores}")
    return lines + schedule_free_decay(cfg, p, total, spe)


def schedule_free_decay(cfg: DictConfig, p: Problems, total: int | None, spe: int | None) -> list[str]:
    """A schedule-free optimizer (train/eval modes, optim/schedule_free.py) under a schedule that decays."""
    opt, known = target(cfg, "optimizer", p), total is not None and (spe or "ep" not in str(get(cfg, "schedule", p)))
    horizon = Horizon(total, spe or 1) if known else Horizon(10**6, 10**3)
    try:
        falls = has_modes(opt) and decays(instantiate(cfg.schedule)(horizon), horizon.total_steps)
    except Exception:
        return []  # a broken schedule is reported by its own check
    return [f"schedule._target_={get(cfg, 'schedule._target_', p)}: the learning rate decays, but {opt.__name__} is "
            "schedule-free: it warms up by itself and its average of the iterates does what a decay would; use "
            "schedule=constant (optimizer.warmup_steps for a warmup), or schedule=warmup_linear"] if falls else []
