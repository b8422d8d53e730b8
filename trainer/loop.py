"""The training loop: one file, read top to bottom.

build() turns a composed config into live objects; Trainer.fit() runs

    autocast forward -> scaled backward (x grad_accum) -> unscale -> gradient transforms -> optimizer step
    -> schedule step -> log at intervals -> evaluate -> early stopping -> checkpoint

and returns the final metrics. Everything a resume needs is in `Trainer.state_dict()`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from core import protocol
from core.batches import DataLoading, DeviceBatches, LoaderBatches, make_batches, sampler_device, split_problem
from core.errors import BadSampleError, ConfigError, UserError
from core.log import RunLogger, print_warning
from core.sampler import SAMPLERS, EpochSampler, RandomSampler
from core.task import Task
from optim.param_groups import config_param_groups
from optim.transforms import Chain, global_norm
from regularize.loss_reduction import REDUCTIONS
from regularize.weight_decay import CoupledWeightDecay, coupled_weight_decay
from schedules import Horizon, build_scheduler
from schedules.horizon import total_steps
from trainer import distributed, resume
from trainer.checkpoint import CheckpointDir, file_digest, load_checkpoint, resume_candidates
from trainer.device import resolve_device, set_threads
from trainer.early_stop import EarlyStopping
from trainer.rng import fork_rng, rank_seed, rng_state, seed_everything, set_rng_state

# A skipped step (non-finite, or an fp16 batch given up) still advances the schedule: the data and the LR move on
# together. LambdaLR warns about that when the very first optimizer step is the one skipped; it is intended here.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")


def _build(node: DictConfig, key: str, *args: Any) -> Any:
    """instantiate(node), then call the result with `args` if given (a `_partial_` factory), turning any
    error into a ConfigError that names the config key instead of a traceback."""
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
    scheduler: torch.optim.lr_scheduler.LambdaLR
    transforms: Chain
    sampler: EpochSampler | RandomSampler
    horizon: Horizon
    autocast: contextlib.AbstractContextManager
    scaler: torch.amp.GradScaler | None
    early_stop: EarlyStopping | None
    coupled_wd: CoupledWeightDecay | None
    dist: distributed.Dist
    batches: DeviceBatches | LoaderBatches  # batches(step): this rank's micro-batches of step `step`


def build(cfg: DictConfig) -> Parts:
    t = cfg.trainer
    dist, device_name = distributed.setup(t.strategy, t.device)
    device = resolve_device(device_name)
    autocast, scaler = _build(cfg.amp, "amp").bind(device)  # config problems surface before data loads
    if t.grad_accum < 1:
        raise ConfigError(f"trainer.grad_accum={t.grad_accum} must be >= 1")
    if cfg.regularize.loss_reduction not in REDUCTIONS:
        raise ConfigError(f"regularize.loss_reduction={cfg.regularize.loss_reduction!r}: use one of "
                          f"{sorted(REDUCTIONS)}")
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

    groups = config_param_groups(model, cfg.regularize)
    optimizer = _build(cfg.optimizer, "optimizer", groups)
    try:
        coupled_wd = coupled_weight_decay(optimizer, cfg.regularize.weight_decay_mode, cfg.regularize.weight_decay)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sampler = SAMPLERS[getattr(task, "sampling", "epoch")](task.train_size, task.batch_size, t.seed,
                                                            sampler_device(task, device))
    try:
        total = total_steps(t.max_steps, t.max_epochs, sampler.steps_per_epoch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    horizon = Horizon(total_steps=int(total), steps_per_epoch=sampler.steps_per_epoch)
    scheduler = build_scheduler(_build(cfg.schedule, "schedule", horizon), optimizer)
    transforms = Chain([_build(node, f"clip.{name}") for name, node in (cfg.clip or {}).items()])
    early_stop = _build(cfg.early_stop, "early_stop") if cfg.early_stop else None
    split = split_problem(task.batch_size, t.grad_accum, dist.world)
    if split:
        raise ConfigError(split)
    warning = protocol.batchnorm_warning(model, task.batch_size, t.grad_accum, dist.world)
    if warning and dist.is_main:
        print_warning(warning)
    batches = make_batches(task, sampler, dist, t.grad_accum, t.seed, horizon.total_steps)
    seed = rank_seed(t.seed, dist.rank)  # per-rank streams for dropout and noise (the initial weights are rank 0's)
    if seed is not None:
        seed_everything(seed)
    return Parts(cfg, device, task, model, optimizer, scheduler, transforms, sampler, horizon, autocast, scaler,
                 early_stop, coupled_wd, dist, batches)


class Interrupted(UserError):
    """SIGTERM / SIGINT: the run stopped (after a checkpoint, unless it says otherwise). Exit code 128 + signal."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteError(UserError):
    """NaN or Inf in the loss or gradients with trainer.nonfinite=raise (or too many skipped in a row)."""


class Trainer:
    def __init__(self, parts: Parts, run_dir: Path) -> None:
        self.p, self.run_dir = parts, Path(run_dir)
        t = parts.cfg.trainer
        h = parts.horizon
        self.total_steps = h.total_steps
        self.grad_accum = t.grad_accum
        self.log_every = max(1, h.steps(t.log_interval))
        self.eval_every = h.steps(t.eval_interval)
        self.ckpt_every = h.steps(t.checkpoint_interval)
        self.hist_every = h.steps(t.histogram_interval)
        self.reduce = REDUCTIONS[parts.cfg.regularize.loss_reduction]
        self.nonfinite, self.max_nonfinite = t.nonfinite, t.max_nonfinite
        if self.nonfinite not in ("raise", "skip"):
            raise ConfigError(f"trainer.nonfinite={self.nonfinite!r}: use raise or skip")
        # fp16: an overflowing batch is redone at the halved loss scale at most this often, and never below the
        # minimum scale (fairseq's min_loss_scale); then it counts as a non-finite step.
        self.fp16_max_retries, self.fp16_min_scale = t.fp16_max_retries, t.fp16_min_scale
        self.fp16_retries = 0
        # Optimizers whose rule uses the loss (AdaLo) declare `requires_loss` and get it as step(loss=...).
        self.needs_loss = getattr(parts.optimizer, "requires_loss", False)
        self.params = [p for p in parts.model.parameters() if p.requires_grad]
        self.checkpoints = CheckpointDir(self.run_dir / "checkpoints", keep=t.keep_checkpoints)
        model = torch.compile(parts.model) if t.compile else parts.model
        if parts.dist.enabled:
            ids = [parts.device.index] if parts.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.train_model = model
        self.signal: int | None = None
        self.last_checkpoint: Path | None = None  # written by this process (the main rank)
        self.run_id = ""  # set by trainer.run: written into every checkpoint (a run directory holds one run)
        self.data = parts.task.data_fingerprint()  # what a resume must find again (once per run: it may stat files)
        # Resumable loop state (everything else lives in the parts' own state_dicts).
        self.step = 0
        self.loss_sum = torch.zeros((), device=parts.device)  # train loss summed since the last log
        self.loss_count = 0
        self.last_eval_step = -1
        self.last_metrics: dict[str, float] = {}  # of the evaluation at last_eval_step
        self.stop_reason = ""  # early stopping's decision (survives resume)
        self.train_time = 0.0  # seconds of training so far: evaluation, checkpoints and pictures left out
        self.wall_time = 0.0  # seconds of the run's earlier sessions, up to the checkpoint each resume loaded
        self.skipped = {"nonfinite": 0, "nonfinite_in_a_row": 0, "fp16_overflow": 0}
        # with nonfinite=raise: the first step whose loss was not finite, kept on the device (-1: none)
        self.first_bad_step = torch.full((), -1, device=parts.device, dtype=torch.long)
        self.params_checked_at = 0  # the last step at which every parameter was seen finite
        self._excluded = 0.0  # seconds of this fit() spent outside training (evaluation, checkpoints, pictures)
        self.losses_checked = False  # loss()'s shape, checked on the first step this process runs

    # -- checkpoint state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs. Collective under DDP: every rank contributes its own RNG state."""
        p = self.p
        rng = rng_state()
        return {
            "step": self.step,
            "run_id": self.run_id,
            "model": p.model.state_dict(),
            "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(),
            "scaler": p.scaler.state_dict() if p.scaler else None,
            "transforms": p.transforms.state_dict(),
            "early_stop": p.early_stop.state_dict() if p.early_stop else None,
            "rng": rng,
            "rng_ranks": p.dist.all_gather(rng),
            "loop": {"loss_sum": self.loss_sum, "loss_count": self.loss_count, "last_eval_step": self.last_eval_step,
                     "last_metrics": dict(self.last_metrics), "stop_reason": self.stop_reason,
                     "train_time": self.train_time_now(), "wall_time": self.wall_time_now(),
                     "skipped": dict(self.skipped)},
            "config": OmegaConf.to_container(p.cfg, resolve=True),
            "data": self.data,
        }

    def load_state_dict(self, state: dict[str, Any], changes: dict[str, tuple] | None = None) -> None:
        """Restore a checkpoint. `changes` (config key -> (old, new)) are the resume's accepted config changes:
        hyperparameters and the schedule follow the new config; a new optimizer type starts from fresh state."""
        p, changes = self.p, changes or {}
        fresh = resume.group_hyperparameters(p.optimizer)
        fresh_base_lrs = list(p.scheduler.base_lrs)
        p.model.load_state_dict(state["model"])
        if resume.optimizer_type_changed(changes):
            if p.dist.is_main:
                print_warning("the optimizer's type changed on resume: it starts from fresh optimizer state "
                              "(the model weights, the step and the schedule continue).")
        else:
            p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
        if changes:  # the new config's lr, betas, weight decay..., base LRs and horizon from here on
            resume.reapply_hyperparameters(p.optimizer, fresh)
            resume.rebase_schedule(p.scheduler, fresh_base_lrs)
        if p.scaler and state["scaler"]:
            p.scaler.load_state_dict(state["scaler"])
        p.transforms.load_state_dict(state["transforms"])
        if p.early_stop and state["early_stop"]:
            p.early_stop.load_state_dict(state["early_stop"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == p.dist.world:
            set_rng_state(ranks[p.dist.rank])  # every rank continues its own dropout / augmentation stream
        else:
            set_rng_state(state["rng"])
            if p.dist.enabled:
                torch.manual_seed(p.cfg.trainer.seed * 1_000_003 + self.step * 1_009 + p.dist.rank)
        self.step = state["step"]
        loop = state["loop"]
        self.loss_sum = loop["loss_sum"].to(p.device)
        self.loss_count, self.last_eval_step = loop["loss_count"], loop["last_eval_step"]
        self.last_metrics = dict(loop.get("last_metrics", {}))
        self.train_time = float(loop.get("train_time", 0.0))
        self.wall_time = float(loop.get("wall_time", 0.0))
        self.skipped.update(loop.get("skipped", {}))
        early_stop_changed = any(k == "early_stop" or k.startswith("early_stop.") for k in changes)
        if loop.get("stop_reason") and p.early_stop and not early_stop_changed:
            self.stop_reason = loop["stop_reason"]  # an early-stopped run stays stopped
        self.params_checked_at = self.step

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Load the newest readable checkpoint at `path` (a file, a run directory or its checkpoints folder),
        after checking its config against this run's. Returns what was resumed: checkpoint, sha256, step, changes."""
        t = self.p.cfg.trainer
        unreadable: list[str] = []
        for ckpt in resume_candidates(path):
            try:
                state = load_checkpoint(ckpt, map_location=self.p.device, advice=False)
            except UserError as e:  # truncated or corrupt: fall back to the one before
                unreadable.append(str(e))
                continue
            if unreadable and self.p.dist.is_main:  # recovered: the run goes on from an older step
                print_warning(f"{' '.join(unreadable)} Resuming from the previous one, {ckpt.name} (step "
                              f"{state['step']}): the steps after it are trained again.")
            if "optimizer" not in state:
                raise UserError(f"trainer.resume={path}: {ckpt} holds only model weights (best.pt keeps the best "
                                "evaluation's weights), not a training state. Resume from a step-*.pt checkpoint "
                                "or a run directory.")
            new = OmegaConf.to_container(self.p.cfg, resolve=True)
            changes = resume.check_changes(state.get("config", {}), new, str(path),
                                           allow=t.resume_allow_changes)
            changes.update(resume.check_data(state.get("data"), self.data, str(path),
                                             allow=t.resume_allow_data_changes))
            self.load_state_dict(state, changes)
            return {"checkpoint": ckpt, "sha256": file_digest(ckpt), "step": self.step, "run_id": state.get("run_id"),
                    "changes": {k: list(v) for k, v in changes.items() if not k.startswith("trainer.resume")}}
        raise UserError(f"trainer.resume={path}: no readable checkpoint there. " + " ".join(unreadable))

    def save(self) -> Path | None:
        """A checkpoint of the current step; never of non-finite weights (collective under DDP)."""
        with self._not_training():
            self._check_params()
            state = self.state_dict()
            if self.p.dist.is_main:
                self.last_checkpoint = self.checkpoints.save(state, self.step)
                return self.last_checkpoint
        return None

    # -- time --------------------------------------------------------------------------------------------------
    def wall_time_now(self) -> float:
        """Seconds of the whole run so far: every session's fit() up to this moment (or to its last checkpoint)."""
        return self.wall_time + (time.perf_counter() - self._fit_start if hasattr(self, "_fit_start") else 0.0)

    def train_time_now(self) -> float:
        if not hasattr(self, "_fit_start"):
            return self.train_time
        return self.train_time + (time.perf_counter() - self._fit_start) - self._excluded

    @contextlib.contextmanager
    def _not_training(self) -> Iterator[None]:
        """Time spent in here (evaluation, checkpoints, pictures, histograms) is not training time."""
        self._depth = getattr(self, "_depth", 0) + 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._excluded += time.perf_counter() - start

    # -- the loop -----------------------------------------------------------------------------------------
    def fit(self, log: RunLogger) -> dict[str, Any]:
        try:
            return self._fit(log)
        except BadSampleError as e:  # a broken file met mid-run: fixed, the run resumes from its last checkpoint
            raise type(e)(f"{e}\nStopped at step {self.step}; {self.resume_hint('once the data are fixed, ')}") \
                from None

    def _fit(self, log: RunLogger) -> dict[str, Any]:
        p = self.p
        opt, task = p.optimizer, p.task
        self._fit_start, self._excluded = time.perf_counter(), 0.0
        tick, tick_step = self.train_time_now(), self.step
        if getattr(task, "check_evaluate_first", True):  # a duck-typed task has no such attribute
            with self._not_training():  # evaluate() checked before a step is spent on it
                self._check_monitored(self._eval_metrics())
        self.train_model.train()
        while self.step < self.total_steps and not self.stop_reason:
            logging_now = (self.step + 1) % self.log_every == 0
            step_loss = self._forward_backward(self.step)
            if logging_now:
                lrs = [g["lr"] for g in opt.param_groups]
            norms = self._update(step_loss, logging_now)
            if norms is None:  # fp16 overflow: GradScaler skipped the step; redo it with the lowered scale
                opt.zero_grad(set_to_none=True)
                continue
            p.scheduler.step()
            self.step += 1
            if self.hist_every and self.step % self.hist_every == 0:
                with self._not_training():
                    self._histograms(log)
            opt.zero_grad(set_to_none=True)
            log.advance(self.step)

            if logging_now:  # the only host synchronisation of a training step, once per interval
                self._check_finite()
                now = self.train_time_now()
                self._log(log, lrs, norms, samples_per_s=(self.step - tick_step) * task.batch_size / (now - tick))
                tick, tick_step = self.train_time_now(), self.step
            if self.eval_every and self.step % self.eval_every == 0:
                self._check_finite()
                self._evaluate(log)
            if self.ckpt_every and self.step % self.ckpt_every == 0:
                self._check_finite()
                self.save()
            if self.signal is not None:
                self._check_finite()
                self._interrupted()

        # The end: a last evaluation (unless this step was just evaluated) and checkpoint, then the best weights
        # back if early stopping kept them. A signal here stops the run too, saying how far the end got.
        self._check_finite()
        train_time = self.train_time_now()
        with self._not_training():
            self._check_params()
            metrics = self.last_metrics if self.last_eval_step == self.step else self._evaluate(log)
            if self.signal is not None:
                self._interrupted(" during the final evaluation")
            saved = self.save() if not self.ckpt_every or self.step % self.ckpt_every else self.last_checkpoint
            self._stop_if_signalled(saved, "final_metrics.json is not written yet")
            final = {"step": self.step, "epoch": round(self.step / p.sampler.steps_per_epoch, 4)}
            if p.early_stop and p.early_stop.restore(p.model):
                final["restored_best_step"] = p.early_stop.best_step
                log.info(f"restored the best weights (step {p.early_stop.best_step}, "
                         f"{p.early_stop.monitor}={p.early_stop.best:.6g})")
                if p.early_stop.best_step != self.step:  # other weights than the ones just evaluated
                    metrics = self._eval_metrics()
            final.update(metrics)
            if hasattr(task, "final_metrics"):  # e.g. the test set, scored once with the final weights
                tests = self._eval_metrics("final_metrics")
                final.update(tests)
                protocol.check_monitored(p.cfg, task, self._watched(), metrics, tests)
            self._stop_if_signalled(saved, "final_metrics.json is not written yet")
        final.update({"wall_time_s": round(self.wall_time_now(), 2),
                      "session_wall_time_s": round(time.perf_counter() - self._fit_start, 2),
                      "train_time_s": round(train_time, 3), "stop_reason": self.stop_reason or "max steps reached"})
        final.update({f"skipped_{k}": v for k, v in self.skipped.items() if v and k != "nonfinite_in_a_row"})
        self._check_final(final)
        if p.dist.is_main:
            (self.run_dir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
            if p.cfg.trainer.pictures and hasattr(task, "save_pictures"):
                task.save_pictures(p.model, self.run_dir / "pictures")
        self._stop_if_signalled(saved, "final_metrics.json is written; pictures/ may be incomplete")
        return final

    def _check_final(self, final: dict[str, Any]) -> None:
        """No run ends with a non-finite metric and exit 0: it is an error that says where the trouble began."""
        bad = {k: v for k, v in final.items() if isinstance(v, float) and not math.isfinite(v)}
        if not bad:
            return
        k, v = next(iter(bad.items()))
        first = int(self.first_bad_step.item())
        where = (f"the training loss first went non-finite at step {first}" if first >= 0 else
                 f"the training loss and the parameters stayed finite through step {self.step}")
        raise NonFiniteError(f"final metric {k} is {v} ({', '.join(f'{a}={b}' for a, b in bad.items())}); {where}. "
                             "The run is not reported as finished. Try a lower optimizer.lr or clip=norm.")

    def _check_params(self) -> None:
        """Every parameter finite after the update just made (one host sync: before checkpoints and at the end)."""
        if self.step == self.params_checked_at:
            return
        finite = torch.stack([torch.isfinite(q).all() for q in self.params]).all()
        if not bool(finite.item()):
            last = self.checkpoints.step_files()
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written before it"
            raise NonFiniteError(
                f"parameters are not finite after step {self.step} (they were finite at step "
                f"{self.params_checked_at}): an update diverged; stopped without writing a checkpoint ({where}). "
                "Try a lower optimizer.lr, clip=norm, or a warmup (schedule=cosine_warmup).")
        self.params_checked_at = self.step

    # -- one optimizer step -------------------------------------------------------------------------------
    def _forward_backward(self, step: int) -> torch.Tensor:
        """Forward and backward over grad_accum micro-batches of this rank's share of step `step`'s global batch;
        returns the step's mean loss (a device tensor). The loss is normalised by the rank's whole share, so the
        accumulated gradient equals the large batch's."""
        p = self.p
        model, task = self.train_model, p.task
        share = task.batch_size // p.dist.world
        step_loss = 0.0
        for m, batch in enumerate(p.batches(step)):
            last = m == self.grad_accum - 1
            # DDP: all-reduce gradients once, on the last micro-batch
            sync = contextlib.nullcontext() if last or not p.dist.enabled else model.no_sync()
            with sync:
                with p.autocast:
                    losses = task.loss(model, batch)
                    if not self.losses_checked:
                        self._check_losses(losses)
                    loss = self.reduce(losses, share)
                (p.scaler.scale(loss) if p.scaler else loss).backward()
            step_loss = step_loss + loss.detach()
        self.losses_checked = True
        return step_loss

    def _check_losses(self, losses: Any) -> None:
        p = self.p
        batch = f"task.batch_size={p.task.batch_size}" + (f" / {p.dist.world} ranks" if p.dist.world > 1 else "") \
            + (f" / trainer.grad_accum={self.grad_accum}" if self.grad_accum > 1 else "")
        protocol.check_losses(p.task, losses, p.task.batch_size // (p.dist.world * self.grad_accum), batch)

    def _update(self, step_loss: torch.Tensor, logging_now: bool) -> dict[str, torch.Tensor] | None:
        """Unscale -> coupled weight decay -> gradient transforms -> optimizer step. Returns the gradient norms
        to log (empty when not logging), or None when fp16 loss scaling overflowed and the step was skipped."""
        p, opt = self.p, self.p.optimizer
        if p.scaler:
            p.scaler.unscale_(opt)
        if p.coupled_wd:  # L2 in the loss: its gradient wd*p, before clipping sees the gradient
            p.coupled_wd()
        norms = {}
        if logging_now:
            norms["train/grad_norm"] = global_norm(self.params)
        p.transforms(self.params)
        if logging_now and p.transforms:
            norms["train/grad_norm_after_transforms"] = global_norm(self.params)
        if self.nonfinite == "skip" and not p.scaler and not self._finite_or_skip(step_loss):
            return norms  # parameters and optimizer state untouched; the data moves on
        if self.nonfinite == "raise":  # recorded on the device, checked at the next interval (no sync here)
            bad = ~torch.isfinite(step_loss) & (self.first_bad_step < 0)
            self.first_bad_step = torch.where(bad, self.step, self.first_bad_step)
        kwargs = {"loss": step_loss} if self.needs_loss else {}
        if p.scaler:
            # GradScaler.step already synchronises to decide whether to skip; reading the scale costs nothing more
            scale = p.scaler.get_scale()
            p.scaler.step(opt, **kwargs)
            p.scaler.update()
            new_scale = p.scaler.get_scale()
            if new_scale < scale:  # the scaler found inf/NaN gradients and skipped the update
                self.skipped["fp16_overflow"] += 1
                self.fp16_retries += 1
                if self.fp16_retries <= self.fp16_max_retries and new_scale >= self.fp16_min_scale:
                    return None
                retries, self.fp16_retries = self.fp16_retries, 0
                self._nonfinite_step(f"the gradient stayed non-finite through {retries} fp16 attempts (loss scale "
                                     f"down to {new_scale:g}; trainer.fp16_max_retries={self.fp16_max_retries}, "
                                     f"trainer.fp16_min_scale={self.fp16_min_scale:g})", fatal=False)
                return norms  # parameters untouched; the data moves on
            self.fp16_retries = 0
            self.skipped["nonfinite_in_a_row"] = 0
        else:
            opt.step(**kwargs)
        self.loss_sum += step_loss
        self.loss_count += 1
        return norms

    def _nonfinite_step(self, why: str, fatal: bool = True) -> None:
        """A step given up as non-finite: parameters untouched, counted, and `trainer.max_nonfinite` in a row end the
        run (an error with nonfinite=raise, a stop with skip). With nonfinite=raise a `fatal` step is an error at
        once; an fp16 batch given up after its retries is not fatal (loss-scale calibration skips a few)."""
        if self.nonfinite == "raise" and fatal:
            raise NonFiniteError(f"non-finite step {self.step}: {why}. Try a lower optimizer.lr, clip=norm, amp=bf16 "
                                 "instead of fp16, or trainer.nonfinite=skip to skip such steps.")
        self.skipped["nonfinite"] += 1
        self.skipped["nonfinite_in_a_row"] += 1
        if self.skipped["nonfinite_in_a_row"] >= self.max_nonfinite:
            reason = (f"{self.max_nonfinite} non-finite steps in a row (last at step {self.step}: {why}); "
                      "lower the learning rate, add clip=norm, or check the data")
            if self.nonfinite == "raise":
                raise NonFiniteError(f"stopped: {reason}.")
            self.stop_reason = reason

    def _finite_or_skip(self, step_loss: torch.Tensor) -> bool:
        """nonfinite=skip: one host sync per step (like fp16's GradScaler) to decide before the optimizer runs."""
        finite = torch.isfinite(step_loss) & torch.isfinite(global_norm(self.params))
        if self.p.dist.agree(bool(finite.item())):
            self.skipped["nonfinite_in_a_row"] = 0
            return True
        self._nonfinite_step("the loss or the gradient is not finite")
        return False

    def _check_finite(self) -> None:
        if self.nonfinite != "raise":
            return
        bad = int(self.first_bad_step.item())
        if bad >= 0:
            last = self.checkpoints.step_files()
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written before it"
            raise NonFiniteError(
                f"non-finite training loss at step {bad}; stopped ({where}). Try a lower optimizer.lr, clip=norm, "
                f"amp=bf16 instead of fp16, or trainer.nonfinite=skip to skip such steps.")

    def _interrupted(self, where: str = "") -> None:
        """After a SIGTERM / SIGINT: a checkpoint of this step, then Interrupted with the command that resumes."""
        path = self.save()
        self.p.dist.barrier()
        raise Interrupted(f"stopped by {signal.Signals(self.signal).name} at step {self.step}{where}; checkpoint "
                          f"{path or self.run_dir}. Resume with:\n  {self.resume_command()}", self.signal)

    def _stop_if_signalled(self, saved: Path | None, what: str) -> None:
        """A signal after the final checkpoint was written: the run's training is complete; say what is left."""
        if self.signal is None:
            return
        self.p.dist.barrier()
        raise Interrupted(f"stopped by {signal.Signals(self.signal).name} at step {self.step}, after the run's final "
                          f"checkpoint {saved or self.checkpoints.root}: its training is complete and {what}. "
                          f"Resume with (it trains no further; it evaluates and writes the final metrics and "
                          f"pictures):\n  {self.resume_command()}", self.signal)

    def resume_command(self) -> str:
        """The command line that continues this run (train.py's own, with trainer.resume=<run dir>)."""
        args = [a for a in sys.argv[1:] if not a.startswith("trainer.resume=")]
        return shlex.join(["python", Path(sys.argv[0]).name, *args, f"trainer.resume={self.run_dir}"])

    def resume_hint(self, once: str = "") -> str:
        """Where a run stopped without a checkpoint of its step continues from (`once`: what must happen first)."""
        last = self.checkpoints.step_files()
        if not last:
            return f"no checkpoint was written before it: {once}run the same command again."
        then = f"{once[:1].upper()}{once[1:]}resume" if once else "Resume"
        return f"the last checkpoint is {last[-1]}. {then} with:\n  {self.resume_command()}"

    def _log(self, log: RunLogger, lrs: list[float], norms: dict[str, torch.Tensor], samples_per_s: float) -> None:
        p, task = self.p, self.p.task
        mean_loss = p.dist.all_mean(self.loss_sum / max(1, self.loss_count))
        scalars = {"train/loss": mean_loss.item(), "train/lr": lrs[0], "train/samples_per_s": samples_per_s,
                   "train/epoch": self.step / p.sampler.steps_per_epoch}
        scalars.update({k: v.item() for k, v in norms.items()})
        if hasattr(task, "tokens_per_sample"):
            scalars["train/tokens_per_s"] = samples_per_s * task.tokens_per_sample
        for i, (g, lr) in enumerate(zip(p.optimizer.param_groups, lrs)):
            scalars[f"lr/{g.get('name', i)}"] = lr
        if p.scaler:
            scalars["train/loss_scale"] = p.scaler.get_scale()
        for k, v in self.skipped.items():
            if v and k != "nonfinite_in_a_row":
                scalars[f"train/skipped_{k}"] = v
        log.scalars(self.step, scalars, console=True)
        self.loss_sum.zero_()
        self.loss_count = 0

    # -- pieces of the loop -------------------------------------------------------------------------------
    def _eval_metrics(self, method: str = "evaluate") -> dict[str, float]:
        """The task's `method` (evaluate or final_metrics) in eval mode, on a private RNG stream: metrics are
        repeatable and training's RNG is untouched."""
        p = self.p
        evaluate = getattr(p.task, method)
        p.model.eval()
        with fork_rng(p.device), torch.no_grad(), p.autocast:
            torch.manual_seed(p.cfg.trainer.seed + 1)
            metrics = evaluate(p.model)
        p.model.train()
        return protocol.as_metrics(p.task, metrics, f"{method}()")

    def _watched(self) -> list[tuple[str, str, bool]]:
        observers = [fn for fn in self.p.scheduler.lr_lambdas if hasattr(fn, "observe")]
        return protocol.monitored(self.p.cfg, self.p.early_stop, observers)

    def _check_monitored(self, metrics: dict[str, float]) -> None:
        """The metrics the run watches are among this evaluation's (a dict lookup; monitor.metric may come from
        final_metrics(): checked at the end)."""
        protocol.check_monitored(self.p.cfg, self.p.task, self._watched(), metrics, None)

    def _evaluate(self, log: RunLogger) -> dict[str, float]:
        p = self.p
        train_time = self.train_time_now()
        with self._not_training():
            metrics = self._eval_metrics()
            self._check_monitored(metrics)
            self.last_eval_step, self.last_metrics = self.step, dict(metrics)
            log.scalars(self.step, {**{f"eval/{k}": v for k, v in metrics.items()},
                                    "time/train_s": round(train_time, 3)})
            log.info(f"eval @ step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if p.cfg.trainer.pictures and log.writer is not None:
                p.model.eval()
                with fork_rng(p.device):
                    p.task.pictures(p.model, log.writer, self.step)
                p.model.train()
            self._observe(metrics)
            if p.early_stop:
                stop = p.dist.agree(p.early_stop.update(metrics, self.step, p.model))  # ranks stop together
                if p.early_stop.best_step == self.step and p.dist.is_main:
                    self.checkpoints.save_best({"step": self.step, "model": p.model.state_dict(), "metrics": metrics})
                if stop:
                    self.stop_reason = p.early_stop.reason
                    log.info(self.stop_reason)
        return metrics

    def _observe(self, metrics: dict[str, float]) -> None:
        """Metric-driven schedules (reduce on plateau) see each evaluation; a changed multiplier takes effect
        from the very next update (LambdaLR would otherwise apply it one step late)."""
        sched = self.p.scheduler
        observers = [fn for fn in sched.lr_lambdas if hasattr(fn, "observe")]
        for fn in observers:
            fn.observe(metrics)
        if observers:
            for group, base, fn in zip(self.p.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * fn(sched.last_epoch)

    def _histograms(self, log: RunLogger) -> None:
        """Parameter and gradient histograms per layer (long-tailed gradients show up here)."""
        if log.writer is None:
            return
        for name, param in self.p.model.named_parameters():
            log.writer.add_histogram(f"params/{name}", param.detach().float().cpu(), self.step)
            if param.grad is not None:
                log.writer.add_histogram(f"grads/{name}", param.grad.detach().float().cpu(), self.step)
