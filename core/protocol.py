"""The task protocol (core/task.py) checked where the trainer first relies on it, once, with the rule and the fix
in the message (TaskError: exit code 2, no traceback):

- the task's attributes, before its data load: batch_size an int >= 1, the methods, a known `sampling`;
- loss()'s result on the first step: one value per sample of the micro-batch (a shape, known on the host);
- evaluate()'s result at every evaluation: {name: number}, 0-d tensors taken as floats. A task is also evaluated once
  before training (unless it sets `check_evaluate_first = False`, as kiln's own tasks do: their declared metrics are
  tested against what they return), so a broken evaluate() or a metric it does not report wastes no step;
- the metrics the config watches (monitor.metric, early_stop.monitor, schedule.monitor) against each evaluation's
  keys (the config check compares them with the task's declared metrics, when it declares them).
"""

from __future__ import annotations

import inspect
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from core.errors import TaskError
from core.messages import closest
from core.task import Task

METHODS = ("setup", "build_model", "loss", "evaluate")
SAMPLINGS = ("epoch", "random")
EVALUATE = "evaluate(model) returns {name: number} (Python floats or 0-d tensors), one per metric"


def task_name(task: Any) -> str:
    return f"{type(task).__module__}.{type(task).__qualname__}"


def overrides(task: Any, hook: str) -> bool:
    """Does the task's class define its own optional `hook` (not core/task.py's default)?"""
    return getattr(type(task), hook, getattr(Task, hook)) is not getattr(Task, hook)


def _contract(method: Any) -> str:
    """The first sentence of a Task method's docstring: the rule as core/task.py states it."""
    doc = " ".join((inspect.getdoc(method) or "").split())
    return re.match(r"(.+?\.)(?:\s|$)", doc).group(1)


def _broken(task: Any, what: str) -> TaskError:
    return TaskError(f"the task {task_name(task)} breaks the task protocol: {what}")


def check_task(task: Any) -> None:
    """The attributes and methods the trainer needs, before the task loads its data."""
    missing = [m for m in METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise _broken(task, f"it has no {', '.join(f'{m}()' for m in missing)} (core/task.py: subclass "
                            "core.task.Task and implement its abstract methods)")
    rule = ("(core/task.py: batch_size: the global batch size, per optimizer step over all DDP ranks and "
            "micro-batches, an int >= 1; set it in __init__ from the task.batch_size config key)")
    if not hasattr(task, "batch_size"):
        raise _broken(task, f"it has no batch_size {rule}")
    size = task.batch_size
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise _broken(task, f"it has batch_size={size!r} {rule}")
    sampling = getattr(task, "sampling", "epoch")
    if sampling not in SAMPLINGS:
        raise _broken(task, f"sampling={sampling!r}; use 'epoch' or 'random' (core/task.py)")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "a scalar" if value.dim() == 0 else f"a tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def check_losses(task: Any, losses: Any, micro: int, batch: str) -> None:
    """loss() gave one value per sample of a micro-batch of `micro` samples (`batch` says where that number comes
    from). Shapes are known on the host: no synchronisation."""
    if isinstance(losses, torch.Tensor) and losses.shape == (micro,):
        return
    raise TaskError(
        f"{task_name(task)}.loss returned {_describe(losses)} for a micro-batch of {micro} samples ({batch}). "
        f'core/task.py: loss returns "{_contract(Task.loss)}" The trainer reduces them itself '
        f"(regularize.loss_reduction): a loss already averaged over the batch (per_sample.mean()) would train with "
        f"1/{micro} of the gradient. Return one loss per sample, e.g. (model(x) - y).pow(2).mean(1) or "
        'F.cross_entropy(logits, y, reduction="none").')


def as_metrics(task: Any, result: Any, what: str = "evaluate()") -> dict[str, Any]:
    """evaluate()'s (or final_metrics()'s) result as {name: Python number}, or a TaskError saying what is wrong."""
    rule = f"core/task.py: {EVALUATE}"
    if not isinstance(result, Mapping):
        raise _broken(task, f"{what} returned a {type(result).__name__}, not a dict ({rule})")
    metrics = {}
    for name, value in result.items():
        if not isinstance(name, str):
            raise _broken(task, f"{what} has the key {name!r} ({type(name).__name__}, not str) ({rule})")
        if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a 0-d tensor or a numpy scalar
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            shown = _describe(value) if isinstance(value, torch.Tensor) else f"a {type(value).__name__} ({value!r})"
            raise _broken(task, f"{what}[{name!r}] is {shown} ({rule})")
        metrics[name] = value
    return metrics


def batchnorm_warning(model: nn.Module, batch_size: int, grad_accum: int, world: int) -> str | None:
    """Why the gradient is not the large batch's when BatchNorm sees micro-batches (None when it is)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    synced = all(isinstance(m, nn.SyncBatchNorm) for _, m in layers)
    split = ([f"{world} DDP ranks"] if world > 1 and not synced else []) + \
        ([f"trainer.grad_accum={grad_accum}"] if grad_accum > 1 else [])
    if not layers or not split:
        return None
    names = ", ".join(f"{n}: {type(m).__name__}" for n, m in layers[:3]) + \
        (f", {len(layers) - 3} more" if len(layers) > 3 else "")
    micro = batch_size // (grad_accum * (1 if synced else world))
    fix = "trainer.grad_accum=1" if grad_accum > 1 else "torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)"
    return (f"{' x '.join(split)} with BatchNorm layers ({names}): each micro-batch of {micro} samples is normalised "
            f"with its own statistics, so the accumulated gradient is not the {batch_size}-sample batch's (close "
            f"when micro-batches are large). For the large batch's gradient use {fix}, or a per-sample norm "
            "(norm=layernorm for the built-in models; nn.LayerNorm or nn.GroupNorm in your own).")


def monitored(cfg: DictConfig, early_stop: Any, observers: list[Any]) -> list[tuple[str, str, bool]]:
    """(config key, metric name, needed at every evaluation) for each metric the run watches."""
    watched = []
    monitor = cfg.get("monitor")
    if isinstance(monitor, DictConfig) and isinstance(monitor.get("metric"), str):
        watched.append(("monitor.metric", monitor.metric, False))
    if early_stop is not None:
        watched.append(("early_stop.monitor", early_stop.monitor, True))
    for fn in observers:
        name = getattr(fn, "monitor", None)
        if isinstance(name, str):
            watched.append(("schedule.monitor", name.removeprefix("eval/"), True))
    return list(dict.fromkeys(watched))


def unreported(cfg: DictConfig, key: str, name: str, task: str, evals: Iterable[str], finals: Iterable[str],
               every_eval: bool) -> str | None:
    """The line for the metric `name` that `key` watches when the task does not report it where needed (in each
    evaluation's `evals`, or for monitor.metric also in final_metrics()' `finals`); None when it does. One rule:
    the config check asks it of the declared metrics, the trainer of the reported ones."""
    evals, finals = list(evals), list(finals)
    choices = evals + ([] if every_eval else finals)
    if name in choices:
        return None
    why = "reports it once, at the end, not at each evaluation" if name in finals else "does not report it"
    reports = f"its evaluate() reports {', '.join(evals) or 'nothing'}" + \
        (f" and final_metrics() {', '.join(finals)}" if finals else "")
    close = closest(name, choices)
    fix = f"{f'did you mean {close!r}? ' if close else ''}set {' or '.join(f'{key}={m}' for m in choices)} (the " \
          "task's YAML or the command line)" if choices else ""
    via = "".join(f" (from ${{{s}}})" for s in interpolated_from(cfg, key))
    return f"{key}={name!r}{via}: the task {task} {why}; {reports}" + (f"; {fix}" if fix else "")


def check_monitored(cfg: DictConfig, task: Any, watched: list[tuple[str, str, bool]], evals: Mapping[str, Any],
                    finals: Mapping[str, Any] | None) -> None:
    """Every watched metric is among the evaluation's keys (or, for monitor.metric, final_metrics()'s: None while
    those are not known yet, which defers monitor.metric to the end when the task has final_metrics)."""
    lines = [unreported(cfg, key, name, task_name(task), evals, finals or {}, every_eval)
             for key, name, every_eval in watched if every_eval or finals is not None
             or not overrides(task, "final_metrics")]
    if any(lines):
        raise TaskError("the run watches a metric the task does not report:\n" +
                        "\n".join(f"  {x}" for x in lines if x))


_INTERP = re.compile(r"\$\{(\.*[A-Za-z_][\w.\[\]]*)\}")


def interpolated_from(cfg: DictConfig, key: str) -> list[str]:
    """The full keys `key`'s value interpolates (`${monitor.metric}` -> ['monitor.metric'], `${.lr}` next to
    optimizer.x -> ['optimizer.lr']); [] for a plain value."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if isinstance(parent, ListConfig) and leaf.isdigit() and int(leaf) < len(parent):
        leaf = int(leaf)  # an item of a list: optimizer.betas.1
    elif not isinstance(parent, DictConfig) or leaf not in parent:
        return []
    refs = _INTERP.findall(str(parent._get_node(leaf)._value())) if OmegaConf.is_interpolation(parent, leaf) else []
    dots = [len(r) - len(r.lstrip(".")) for r in refs]  # relative: `.` is `key`'s node, each further `.` its parent
    return [".".join([*key.split(".")[:-n], r[n:]]) if n else r for r, n in zip(refs, dots)]
