"""build(cfg): a composed config turned into the live objects a run trains (Parts), checked where they meet."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from core import protocol
from core.batches import DataLoading, DeviceBatches, LoaderBatches, make_batches, sampler_device, split_problem
from core.errors import ConfigError
from core.log import print_warning
from core.rng import rank_seed, seed_everything
from core.sampler import SAMPLERS, EpochSampler, RandomSampler
from core.task import Task
from optim.averaging import Average
from optim.param_groups import config_param_groups
from optim.transforms import Chain
from regularize.early_stop import EarlyStopping
from regularize.weight_decay import coupled_weight_decay
from schedules import Horizon, Scheduler
from trainer import distributed
from trainer.device import resolve_device, set_threads


def _build(node: DictConfig, key: str, *args: Any) -> Any:
    """instantiate(node), called with `args` if given (a `_partial_` factory); errors name the config key."""
    try:
        obj = instantiate(node)
        return obj(*args) if args else obj
    except ConfigError:
        raise
    except Exception as e:
        cause = e.__cause__ or e
        raise ConfigError(f"{key}: {type(cause).__name__}: {cause}") from None


@dataclass
class Parts:
    """Live objects built from a config (what build() returns)."""

    cfg: DictConfig
    device: torch.device
    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    transforms: Chain  # coupled L2 (if any) first, then cfg.clip in order
    sampler: EpochSampler | RandomSampler
    horizon: Horizon
    autocast: contextlib.AbstractContextManager
    scaler: torch.amp.GradScaler | None
    early_stop: EarlyStopping | None
    dist: distributed.Dist
    batches: DeviceBatches | LoaderBatches  # batches(step): this rank's micro-batches of step `step`
    average: Average | None = None  # average=ema|swa|lawa: the weights evaluated (optim/averaging.py)


def build(cfg: DictConfig) -> Parts:
    t = cfg.trainer
    dist, device_name = distributed.setup(t.strategy, t.device)
    device = resolve_device(device_name)
    autocast, scaler = _build(cfg.amp, "amp").bind(device)  # config problems surface before data loads
    set_threads(t.threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":  # TF32 tensor cores for float32 matmuls and convolutions, or exact float32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(t.tf32)

    seed_everything(t.seed)
    task: Task = _build(cfg.task, "task")
    protocol.check_task(task)
    task.loading = DataLoading.from_config(cfg.get("data"), device, warn=dist.is_main)
    task.setup(device)
    seed_everything(t.seed)  # the model's init does not depend on what data loading drew
    model = task.build_model().to(device)

    optimizer = _build(cfg.optimizer, "optimizer", config_param_groups(model, cfg.regularize))
    try:
        l2 = coupled_weight_decay(optimizer, cfg.regularize.weight_decay_mode, cfg.regularize.weight_decay)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sampler = SAMPLERS[task.sampling](task.train_size, task.batch_size, t.seed, sampler_device(task, device))
    horizon = Horizon.for_run(t.max_steps, t.max_epochs, sampler.steps_per_epoch)
    scheduler = Scheduler(_build(cfg.schedule, "schedule", horizon), optimizer)
    clips = [_build(node, f"clip.{name}") for name, node in (cfg.clip or {}).items()]
    transforms = Chain(([l2] if l2 else []) + clips)
    early_stop = _build(cfg.early_stop, "early_stop") if cfg.early_stop else None
    average = _build(cfg.average, "average", model, horizon) if cfg.get("average") else None
    if split := split_problem(task.batch_size, t.grad_accum, dist.world):
        raise ConfigError(split)
    warning = protocol.batchnorm_warning(model, task.batch_size, t.grad_accum, dist.world)
    if warning and dist.is_main:
        print_warning(warning)
    batches = make_batches(task, sampler, dist, t.grad_accum, t.seed, horizon.total_steps)
    seed = rank_seed(t.seed, dist.rank)  # per-rank streams for dropout and noise (the initial weights are rank 0's)
    if seed is not None:
        seed_everything(seed)
    return Parts(cfg, device, task, model, optimizer, scheduler, transforms, sampler, horizon, autocast, scaler,
                 early_stop, dist, batches, average)
