"""The training loop: Trainer.fit() trains the Parts that trainer/build.py made from a config.

One step: autocast forward -> scaled backward (x grad_accum) -> unscale -> gradient transforms (coupled L2 first)
-> optimizer step -> schedule -> log at intervals -> evaluate -> early stopping -> checkpoint.
Policies live in their own objects: non-finite steps (trainer/nonfinite.py), the run state, resume and time
(trainer/state.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from core import protocol
from core.errors import BadSampleError
from core.log import RunLogger
from core.rng import fork_rng
from optim.batchnorm import recompute_batchnorm
from optim.schedule_free import Modes
from regularize.loss_reduction import REDUCTIONS
from trainer import state
from trainer.build import Parts
from trainer.checkpoint import CheckpointDir, atomic_save
from trainer.nonfinite import REDO, STEP, NonFinite
from trainer.signals import Interrupted, resume_command, resume_hint


class Trainer:
    state_dict, load_state_dict, resume = state.state_dict, state.load_state_dict, state.resume  # trainer/state.py

    def __init__(self, parts: Parts, run_dir: Path) -> None:
        self.p, self.run_dir, t, h = parts, Path(run_dir), parts.cfg.trainer, parts.horizon
        self.total_steps, self.grad_accum = h.total_steps, t.grad_accum
        self.log_every, self.eval_every = max(1, h.steps(t.log_interval)), h.steps(t.eval_interval)
        self.ckpt_every, self.hist_every = h.steps(t.checkpoint_interval), h.steps(t.histogram_interval)
        self.reduce = REDUCTIONS[parts.cfg.regularize.loss_reduction]
        self.needs_loss = getattr(parts.optimizer, "requires_loss", False)  # AdaLo: step(loss=...)
        self.params = [p for p in parts.model.parameters() if p.requires_grad]
        self.checkpoints = CheckpointDir(self.run_dir / "checkpoints", keep=t.keep_checkpoints)
        self.guard = NonFinite(t, parts.device, parts.dist, parts.scaler is not None, self.checkpoints)
        self.clock = state.Clock()
        self.modes = Modes(parts.optimizer, parts.model, self._recompute_batchnorm)  # schedule-free: y trains
        model = torch.compile(parts.model) if t.compile else parts.model
        if parts.dist.enabled:
            ids = [parts.device.index] if parts.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.train_model = model
        self.signal: int | None = None
        self.last_checkpoint: Path | None = None  # written by this process (the main rank)
        self.run_id = ""  # set by trainer.run: written into every checkpoint (a run directory holds one run)
        self.data = parts.task.data_fingerprint()  # what a resume must find again (once per run: it may stat files)
        # Resumable loop state (trainer/state.py; everything else lives in the parts' own state_dicts).
        self.step, self.loss_count, self.last_eval_step = 0, 0, -1
        self.loss_sum = torch.zeros((), device=parts.device)  # train loss summed since the last log
        self.last_metrics: dict[str, float] = {}  # of the evaluation at last_eval_step
        self.stop_reason = ""  # early stopping's (or the non-finite policy's) decision
        self.losses_checked = False  # loss()'s shape, checked on the first step this process runs

    def fit(self, log: RunLogger) -> dict[str, Any]:
        p, opt, guard, clock = self.p, self.p.optimizer, self.guard, self.clock
        clock.start()
        tick, tick_step = clock.train(), self.step
        try:
            if p.task.check_evaluate_first:  # evaluate() checked before a step is spent on it
                with clock.paused():
                    self._check_monitored(self._eval_metrics(p.task.evaluate))
            self.train_model.train()
            while self.step < self.total_steps and not self.stop_reason:
                self.modes.train()
                logging_now = (self.step + 1) % self.log_every == 0
                lrs = [(g["lr"], g.get("d")) for g in opt.param_groups]  # d: Prodigy's, D-Adaptation's estimate
                loss = self._forward_backward(self.step)
                norms = self._update(loss, logging_now)
                if norms is None:  # fp16 overflow: GradScaler skipped the step; redo it with the lowered scale
                    opt.zero_grad(set_to_none=True)
                    continue
                self.step += 1
                p.scheduler.step(self.step)
                if p.average:
                    p.average.update(p.model, self.step)
                if self.hist_every and self.step % self.hist_every == 0:
                    with clock.paused():
                        log.histograms(p.model, self.step)
                opt.zero_grad(set_to_none=True)
                log.advance(self.step)

                if logging_now:  # the only host synchronisation of a training step, once per interval
                    guard.check()
                    self._log(log, lrs, norms, (self.step - tick_step) * p.task.batch_size / (clock.train() - tick))
                    tick, tick_step = clock.train(), self.step
                if self.eval_every and self.step % self.eval_every == 0:
                    guard.check()
                    self._evaluate(log)
                if self.ckpt_every and self.step % self.ckpt_every == 0:
                    guard.check()
                    self.save()
                if self.signal is not None:
                    guard.check()
                    self._stop_if_signalled()
            guard.check()
            return self._finish(log)
        except BadSampleError as e:  # a broken file met mid-run: fixed, the run resumes from its last checkpoint
            hint = resume_hint(self.run_dir, "once the data are fixed, ")
            raise type(e)(f"{e}\nStopped at step {self.step}; {hint}") from None

    def _forward_backward(self, step: int) -> torch.Tensor:
        """Forward and backward over this rank's grad_accum micro-batches of step `step`; returns the step's loss (a
        device tensor), normalised by the rank's whole share so the accumulated gradient equals the large batch's."""
        p, model = self.p, self.train_model
        share, step_loss = p.task.batch_size // p.dist.world, 0.0
        for m, batch in enumerate(p.batches(step)):
            last = m == self.grad_accum - 1  # DDP: all-reduce gradients once, on the last micro-batch
            with contextlib.nullcontext() if last or not p.dist.enabled else model.no_sync():
                with p.autocast:
                    losses = p.task.loss(model, batch)
                    if not self.losses_checked:
                        where = f"task.batch_size={p.task.batch_size}" + \
                            (f" / {p.dist.world} ranks" if p.dist.world > 1 else "") + \
                            (f" / trainer.grad_accum={self.grad_accum}" if self.grad_accum > 1 else "")
                        protocol.check_losses(p.task, losses, share // self.grad_accum, where)
                    loss = self.reduce(losses, share)
                (p.scaler.scale(loss) if p.scaler else loss).backward()
            step_loss = step_loss + loss.detach()
        self.losses_checked = True
        return step_loss

    def _update(self, loss: torch.Tensor, logging_now: bool) -> dict[str, torch.Tensor] | None:
        """Unscale -> gradient transforms -> optimizer step, as the non-finite policy allows. Returns the gradient
        norms to log (empty when not logging), or None when an fp16 overflow asks to redo the step."""
        p, opt, guard = self.p, self.p.optimizer, self.guard
        if p.scaler:
            p.scaler.unscale_(opt)
        norms = p.transforms(self.params, norms=logging_now)
        kwargs = {"loss": loss} if self.needs_loss else {}
        if not guard.admit(loss, self.params, self.step):
            outcome = "skip"
        elif p.scaler:  # GradScaler.step already syncs to decide whether to skip; reading the scale costs no more
            scale = p.scaler.get_scale()
            p.scaler.step(opt, **kwargs)
            p.scaler.update()
            outcome = guard.after_fp16(scale, p.scaler.get_scale(), self.step)
        else:
            opt.step(**kwargs)
            outcome = STEP
        if outcome == STEP:
            self.loss_sum += loss
            self.loss_count += 1
        self.stop_reason = self.stop_reason or guard.stop_reason
        return None if outcome == REDO else norms  # skipped: parameters untouched; the data moves on

    def _log(self, log: RunLogger, lrs: list[tuple], norms: dict[str, torch.Tensor], samples_per_s: float) -> None:
        p, loss = self.p, self.loss_sum / max(1, self.loss_count)
        scalars = {"train/loss": p.dist.all_mean(loss).item(), "train/lr": lrs[0][0],
                   "train/samples_per_s": samples_per_s, "train/epoch": self.step / p.sampler.steps_per_epoch}
        scalars.update({f"train/{k}": v.item() for k, v in norms.items()})
        if p.task.tokens_per_sample:
            scalars["train/tokens_per_s"] = samples_per_s * p.task.tokens_per_sample
        for i, (g, (lr, d)) in enumerate(zip(p.optimizer.param_groups, lrs)):
            scalars[f"lr/{g.get('name', i)}"] = lr
            if d is not None:  # learning-rate-free methods: the step size they estimated, d x lr
                scalars[f"d_lr/{g.get('name', i)}"] = d * lr
        if p.scaler:
            scalars["train/loss_scale"] = p.scaler.get_scale()
        scalars.update({f"train/skipped_{k}": v for k, v in self.guard.counts().items()})
        log.scalars(self.step, scalars, console=True)
        self.loss_sum.zero_()
        self.loss_count = 0

    def _eval_metrics(self, method: Any, what: str = "evaluate()") -> dict[str, float]:
        """The task's `method` (evaluate or final_metrics) in eval mode, on a private RNG stream: metrics are
        repeatable and training's RNG is untouched."""
        p = self.p
        self.modes.eval()
        p.model.eval()
        with fork_rng(p.device), torch.no_grad(), p.autocast:
            torch.manual_seed(p.cfg.trainer.seed + 1)
            metrics = method(p.model)
        p.model.train()
        return protocol.as_metrics(p.task, metrics, what)

    def _raw_metrics(self, method: Any, what: str = "evaluate()") -> dict[str, float]:
        """average.eval=both: the trained weights' metrics of `method`, as raw_<name> (else none)."""
        avg = self.p.average
        return {f"raw_{k}": v for k, v in self._eval_metrics(method, what).items()} if avg and avg.eval == "both" \
            else {}

    @contextlib.contextmanager
    def _averaged(self) -> Iterator[dict[str, float]]:
        """average=...: the average in the model inside (optim/averaging.py); yields the raw_ metrics. A schedule-free
        optimizer's x goes in first: the swap restores what it found."""
        self.modes.eval()
        raw = self._raw_metrics(self.p.task.evaluate)
        with self.p.average.swapped(self.p) if self.p.average else contextlib.nullcontext():
            yield raw

    def _check_monitored(self, metrics: dict[str, float], finals: dict[str, float] | None = None) -> None:
        """The metrics the run watches are among this evaluation's (monitor.metric may come from final_metrics():
        checked at the end)."""
        watched = protocol.monitored(self.p.cfg, self.p.early_stop, self.p.scheduler.monitors)
        protocol.check_monitored(self.p.cfg, self.p.task, watched, metrics, finals)

    def _evaluate(self, log: RunLogger) -> dict[str, float]:
        p, train_time = self.p, self.clock.train()
        with self.clock.paused(), self._averaged() as raw:
            metrics = {**self._eval_metrics(p.task.evaluate), **raw}
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
            p.scheduler.observe(metrics)  # reduce on plateau: a new multiplier applies from the next update
            if p.early_stop:
                stop = p.dist.agree(p.early_stop.update(metrics, self.step, p.model))  # ranks stop together
                if p.early_stop.best_step == self.step and p.dist.is_main:
                    self.checkpoints.save_best({"step": self.step, "model": p.model.state_dict(), "metrics": metrics})
                if stop:
                    self.stop_reason = p.early_stop.reason
                    log.info(self.stop_reason)
        return metrics

    def _finish(self, log: RunLogger) -> dict[str, Any]:
        """The end: a last evaluation (unless this step was just evaluated) and checkpoint, the best weights back if
        early stopping kept them, final_metrics.json. A signal here stops the run too, saying how far it got."""
        p, train_time = self.p, self.clock.train()
        with self.clock.paused():
            self.guard.check_params(self.params, self.step)
            metrics = self.last_metrics if self.last_eval_step == self.step else self._evaluate(log)
            self._stop_if_signalled(" during the final evaluation")
            saved = self.save() if not self.ckpt_every or self.step % self.ckpt_every else self.last_checkpoint
            self._stop_if_signalled(saved=saved, left="final_metrics.json is not written yet")
            final = {"step": self.step, "epoch": round(self.step / p.sampler.steps_per_epoch, 4)}
            raw_tests = self._raw_metrics(p.task.final_metrics, "final_metrics()")
            if p.average and p.average.apply(p) and p.dist.is_main:  # training is over: the average stays in
                atomic_save({"step": self.step, "model": p.model.state_dict()}, self.checkpoints.root / "average.pt")
            if p.early_stop and p.early_stop.restore(p.model):
                final["restored_best_step"] = p.early_stop.best_step
                log.info(f"restored the best weights (step {p.early_stop.best_step}, "
                         f"{p.early_stop.monitor}={p.early_stop.best:.6g})")
                if p.early_stop.best_step != self.step:  # other weights than the ones just evaluated
                    metrics = self._eval_metrics(p.task.evaluate)
            tests = self._eval_metrics(p.task.final_metrics, "final_metrics()")  # e.g. the test set, scored once
            final.update({**metrics, **tests, **raw_tests})
            self._check_monitored(metrics, tests)
            self._stop_if_signalled(saved=saved, left="final_metrics.json is not written yet")
        final.update({"wall_time_s": round(self.clock.wall(), 2), "session_wall_time_s": round(self.clock.session(), 2),
                      "train_time_s": round(train_time, 3), "stop_reason": self.stop_reason or "max steps reached"})
        final.update({f"skipped_{k}": v for k, v in self.guard.counts().items()})
        self.guard.check_final(final, self.step)
        if p.dist.is_main:
            (self.run_dir / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
            if p.cfg.trainer.pictures:
                p.task.save_pictures(p.model, self.run_dir / "pictures")
        self._stop_if_signalled(saved=saved, left="final_metrics.json is written; pictures/ may be incomplete")
        return final

    def save(self) -> Path | None:
        """A checkpoint of the current step; never of non-finite weights (collective under DDP)."""
        with self.clock.paused():
            self.modes.eval()  # a checkpoint holds x as the model, y beside it (optim/schedule_free.py)
            self.guard.check_params(self.params, self.step)
            state_dict = self.state_dict()
            if self.p.dist.is_main:
                self.last_checkpoint = self.checkpoints.save(state_dict, self.step)
                return self.last_checkpoint
        return None

    def _recompute_batchnorm(self, batches: int = 50) -> None:
        """BatchNorm statistics for the weights just switched to (optim/schedule_free.py): the authors' 50 batches,
        the training micro-batches of the steps just taken, on a private RNG stream."""
        p, steps = self.p, range(max(0, self.step - batches), self.step)
        recent = itertools.islice(itertools.chain.from_iterable(p.batches(s) for s in steps), batches)
        with fork_rng(p.device), p.autocast:
            recompute_batchnorm(p.model, recent, lambda b: p.task.loss(p.model, b), p.dist.all_mean)

    def _stop_if_signalled(self, where: str = "", saved: Path | None = None, left: str = "") -> None:
        """After a SIGTERM / SIGINT: a checkpoint of this step (unless the run's final one is `saved` and `left` says
        what is left to do), then Interrupted with the command that resumes."""
        if self.signal is None:
            return
        path = saved if left else self.save()
        self.p.dist.barrier()
        said = (f", after the run's final checkpoint {path or self.checkpoints.root}: its training is complete and "
                f"{left}. Resume with (it trains no further; it evaluates and writes the final metrics and pictures)"
                if left else f"{where}; checkpoint {path or self.run_dir}. Resume with")
        raise Interrupted(f"stopped by {signal.Signals(self.signal).name} at step {self.step}{said}:\n  "
                          f"{resume_command(self.run_dir)}", self.signal)
