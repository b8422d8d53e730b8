"""`trainer.dry_run=true`: print the composed config and the numbers the run would have, then exit (code 0).

The parts are built as for training (data loads, the model is created); nothing is trained.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from optim.core import state_bytes
from optim.param_groups import config_param_groups
from optim.schedule_free import Modes
from trainer.build import build


def optimizer_state_bytes(cfg: DictConfig, model: torch.nn.Module) -> int:
    """Bytes of tensors in the optimizer's state_dict (all but its param_groups) after one step on zero gradients
    (most optimizers create state lazily), for a copy of `model`: the run's own model and optimizer stay untouched."""
    twin = copy.deepcopy(model)
    groups = config_param_groups(twin, cfg.regularize)
    opt = instantiate(cfg.optimizer)(groups)
    Modes(opt, twin).train()  # a schedule-free optimizer steps in train mode only
    for p in twin.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    kwargs = {"loss": torch.zeros((), device=next(twin.parameters()).device)} \
        if getattr(opt, "requires_loss", False) else {}
    opt.step(**kwargs)
    return state_bytes(opt.state_dict())


def dry_run(cfg: DictConfig, console: Console | None = None) -> dict[str, Any]:
    """Print the config and the derived numbers; return the numbers."""
    console = console or Console()
    parts = build(cfg)
    h, t = parts.horizon, cfg.trainer
    warmup = cfg.schedule.get("warmup") if isinstance(cfg.schedule, DictConfig) else None
    numbers: dict[str, Any] = {
        "device": str(parts.device),
        "precision": str(cfg.amp.dtype),
        "train_size": int(parts.task.train_size),
        "batch_size": int(parts.task.batch_size),
        "micro_batch_size": int(parts.task.batch_size) // int(t.grad_accum),
        "steps_per_epoch": int(parts.sampler.steps_per_epoch),
        "total_steps": int(h.total_steps),
        "epochs": round(h.total_steps / parts.sampler.steps_per_epoch, 4),
        "warmup_steps": None if warmup is None else h.steps(warmup),
        "log_interval_steps": max(1, h.steps(t.log_interval)),
        "eval_interval_steps": h.steps(t.eval_interval),
        "checkpoint_interval_steps": h.steps(t.checkpoint_interval),
        "parameters": int(sum(p.numel() for p in parts.model.parameters())),
        "trainable_parameters": int(sum(p.numel() for p in parts.model.parameters() if p.requires_grad)),
        "parameter_bytes": int(sum(p.numel() * p.element_size() for p in parts.model.parameters())),
        "optimizer": type(parts.optimizer).__name__,
        "optimizer_state_bytes": optimizer_state_bytes(cfg, parts.model),
    }
    console.print(OmegaConf.to_yaml(cfg, resolve=True), markup=False, highlight=False)
    table = Table(title="dry run: what this config would run (nothing trained)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in numbers.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    console.print(table)
    return numbers
