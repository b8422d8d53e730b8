"""Weight averaging (config group `average`): the run is evaluated, early-stopped and finished with an average of
its weights along the trajectory instead of the last iterate.

- EMA: a <- d a + (1 - d) w after every step from `start`; d = `decay`, or 0.5 ** (1 / half_life) for a half-life
  in steps or epochs. With `warmup`, d_t = clip(1 - (1 + t / warmup_gamma) ** -warmup_power, min_decay, d) at
  t = step - start - 1 (0 at t <= 0: a copy), as timm's ModelEmaV3.get_decay (timm/utils/model_ema.py).
- SWA (Izmailov et al. 2018, arXiv 1803.05407): the equal mean of the weights at every `every`-th step from `start`.
- LAWA (Kaddour 2022, arXiv 2209.14981; Sanyal et al. 2023, arXiv 2306.03241): the equal mean of the last `k`
  snapshots, taken every `every` steps from `start`.

From torch.optim.swa_utils: AveragedModel holds EMA's and SWA's running average (its float32 copy of the model,
n_averaged, its state_dict); BatchNorm statistics are recomputed by update_bn's rule (optim/batchnorm.py, shared
with the schedule-free optimizers). Written here, and why: the update, one
foreach lerp (the rule of get_ema_multi_avg_fn and get_swa_multi_avg_fn, with timm's decay per step and SWA's
1/(n+1) from a host count): AveragedModel.update_parameters reads its count on the host (bool(n_averaged == 0))
and copies it to the device at every call, a host synchronisation per training step on CUDA
(tests/cuda/test_host_syncs.py catches it); LAWA's ring of k snapshots (AveragedModel keeps one running mean; a
running sum less the oldest snapshot would drift); the swap of the average into the trained model
and back (the trainer's evaluation, early stopping and pictures all read one model). The BatchNorm recompute runs on
the batches of the run's first `bn_steps` steps (both data paths: `batches(step)` is a pure function of the step),
on a forked RNG.

DDP: every rank applies the same update to the same weights, so each rank's own copy is the same average. Only
BatchNorm's running statistics differ between ranks (each rank normalises its own shard): the average's are taken
from rank 0 whenever it is used, or, recomputed, averaged over the ranks' shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

from core.config import parse_duration
from core.rng import fork_rng
from core.task import Task
from optim.batchnorm import batchnorm_layers, recompute_batchnorm

BN = ("average", "recompute")  # BatchNorm statistics of the average: averaged like the weights, or recomputed
EVAL = ("average", "both")  # what evaluations score: the average, or also the trained weights (as raw_<metric>)


class Run(Protocol):
    """What the average needs from the run to recompute BatchNorm statistics (trainer/build.py's Parts)."""

    model: nn.Module
    task: Task
    batches: Callable[[int], Iterable[Any]]  # this rank's micro-batches of a step
    autocast: contextlib.AbstractContextManager
    device: torch.device
    dist: Any  # trainer/distributed.Dist: all_mean, enabled


def _check(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ValueError(f"average.{key}={value!r}: must be {want}")


class Average:
    """What EMA, SWA and LAWA share: when to update, the swap into the model, BatchNorm, state."""

    def __init__(self, model: nn.Module, horizon: Any, start: int | float | str, every: int | float | str, bn: str,
                 bn_steps: int | float | str, eval: str) -> None:
        _check(bn in BN, "bn", bn, "one of " + ", ".join(BN))
        _check(eval in EVAL, "eval", eval, "one of " + ", ".join(EVAL))
        _check(parse_duration(every)[0] > 0, "every", every, "a duration of at least one step")
        self.start, self.every = horizon.steps(start), max(1, horizon.steps(every))  # a fraction: at least 1
        self.bn_steps = min(horizon.steps(bn_steps), horizon.total_steps)
        self.recompute = bn == "recompute" and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                   for m in model.modules())
        _check(not self.recompute or self.bn_steps >= 1, "bn_steps", bn_steps, "at least one step with bn=recompute")
        self.buffers, self.eval = bn == "average", eval
        self.count = 0  # weights averaged so far (EMA: updates)

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0

    def tensors(self, model: nn.Module, buffers: bool | None = None) -> list[torch.Tensor]:
        """What is averaged: the parameters, and the buffers where BatchNorm statistics are averaged."""
        buffers = self.buffers if buffers is None else buffers
        return [t.detach() for t in [*model.parameters(), *(model.buffers() if buffers else ())]]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer step `step` (1-based: the number of updates made)."""
        if self.due(step):
            self._add(model, step)
            self.count += 1

    def _add(self, model: nn.Module, step: int) -> None:
        raise NotImplementedError

    def averaged(self) -> list[torch.Tensor] | None:
        """The average, in tensors()'s order; None before the first update."""
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, run: Run) -> bool:
        """Put the average into run.model (BatchNorm statistics recomputed if asked); False when there is none yet."""
        average = self.averaged()
        if average is None:
            return False
        torch._foreach_copy_(self.tensors(run.model), average)
        if self.recompute:  # each rank's shard of the same steps: their mean is the whole batch's
            with fork_rng(run.device), run.autocast:  # the training RNG does not move
                recompute_batchnorm(run.model, (batch for s in range(self.bn_steps) for batch in run.batches(s)),
                                    lambda batch: run.task.loss(run.model, batch), run.dist.all_mean)
        elif run.dist.enabled:  # BatchNorm statistics: rank 0's on every rank
            for module in batchnorm_layers(run.model):
                for b in (module.running_mean, module.running_var):
                    dist.broadcast(b, 0)
        return True

    @contextlib.contextmanager
    def swapped(self, run: Run) -> Iterator[bool]:
        """The average in run.model inside (True), the trained weights and buffers back after; nothing to swap
        before the first update (False)."""
        if not self.count:
            yield False
            return
        live = self.tensors(run.model, buffers=True)
        saved = [t.clone() for t in live]
        try:
            yield self.apply(run)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


class _Running(Average):
    """EMA and SWA: a running average, kept in torch's AveragedModel."""

    def __init__(self, model: nn.Module, *args: Any) -> None:
        super().__init__(model, *args)
        self.model = AveragedModel(model, use_buffers=self.buffers)
        self.model.module.float()  # kiln's AMP leaves the weights in float32 (autocast); the average stays there too

    def _lerp(self, model: nn.Module, weight: float) -> None:
        """average <- average + weight (weights - average); the first update copies (as AveragedModel's)."""
        pairs = list(zip(self.tensors(self.model.module), self.tensors(model), strict=True))
        floats = [(a, w) for a, w in pairs if a.is_floating_point() and self.count]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [w for _, w in floats], weight)
        others = [(a, w) for a, w in pairs if not (a.is_floating_point() and self.count)]
        if others:  # the first update; integer buffers (num_batches_tracked) are copied, as timm
            torch._foreach_copy_([a for a, _ in others], [w for _, w in others])
        self.model.n_averaged += 1  # a CPU tensor: no device involved

    def averaged(self) -> list[torch.Tensor] | None:
        return self.tensors(self.model.module) if self.count else None

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.model.load_state_dict(state["model"])


class EMA(_Running):
    """Exponential moving average of the weights (timm's ModelEmaV3 decay, with its warmup)."""

    def __init__(self, model: nn.Module, horizon: Any, decay: float = 0.999, half_life: int | float | str | None = None,
                 warmup: bool = True, warmup_gamma: float = 1.0, warmup_power: float = 0.75, min_decay: float = 0.0,
                 start: int | float | str = 0, bn: str = "average", bn_steps: int | float | str = 100,
                 eval: str = "average") -> None:
        super().__init__(model, horizon, start, 1, bn, bn_steps, eval)
        _check(0 <= decay <= 1, "decay", decay, "in [0, 1]")
        _check(half_life is None or parse_duration(half_life)[0] > 0, "half_life", half_life,
               "null or a duration of at least one step")
        _check(warmup_gamma > 0, "warmup_gamma", warmup_gamma, "> 0")
        _check(warmup_power > 0, "warmup_power", warmup_power, "> 0")
        _check(0 <= min_decay <= 1, "min_decay", min_decay, "in [0, 1]")
        self.decay = decay if half_life is None else 0.5 ** (1 / max(1, horizon.steps(half_life)))
        self.warmup, self.warmup_gamma, self.warmup_power = warmup, warmup_gamma, warmup_power
        self.min_decay = min_decay

    def decay_at(self, step: int) -> float:
        """timm's ModelEmaV3.get_decay(step) with update_after_step = start."""
        t = max(0, step - self.start - 1)
        if t <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return max(min(1 - (1 + t / self.warmup_gamma) ** -self.warmup_power, self.decay), self.min_decay)

    def _add(self, model: nn.Module, step: int) -> None:
        self._lerp(model, 1 - self.decay_at(step))


class SWA(_Running):
    """Stochastic weight averaging: the equal mean of the weights at every `every`-th step from `start`."""

    def __init__(self, model: nn.Module, horizon: Any, start: int | float | str = 0.75,
                 every: int | float | str = "1ep", bn: str = "recompute", bn_steps: int | float | str = 100,
                 eval: str = "average") -> None:
        super().__init__(model, horizon, start, every, bn, bn_steps, eval)

    def _add(self, model: nn.Module, step: int) -> None:
        self._lerp(model, 1 / (self.count + 1))  # the equal average (get_swa_multi_avg_fn's weight)


class LAWA(Average):
    """Latest weight averaging: the equal mean of the last `k` snapshots taken every `every` steps from `start`."""

    def __init__(self, model: nn.Module, horizon: Any, k: int = 6, every: int | float | str = "1ep",
                 start: int | float | str = 0, bn: str = "average", bn_steps: int | float | str = 100,
                 eval: str = "average") -> None:
        super().__init__(model, horizon, start, every, bn, bn_steps, eval)
        _check(isinstance(k, int) and k >= 1, "k", k, "an int >= 1")
        self.k = k
        self.ring: list[list[torch.Tensor]] = []  # snapshot i of the run sits in slot i % k (float32)

    def _add(self, model: nn.Module, step: int) -> None:
        current = self.tensors(model)
        if len(self.ring) < self.k:
            self.ring.append([t.to(torch.float32 if t.is_floating_point() else t.dtype, copy=True) for t in current])
        else:
            torch._foreach_copy_(self.ring[self.count % self.k], current)

    def averaged(self) -> list[torch.Tensor] | None:
        if not self.ring:
            return None
        newest = self.ring[(self.count - 1) % self.k]
        mean = [t.clone() for t in self.ring[0]]
        for snapshot in self.ring[1:]:
            torch._foreach_add_(mean, snapshot)
        # integer buffers (num_batches_tracked) are the newest snapshot's
        return [m / len(self.ring) if m.is_floating_point() else n.clone() for m, n in zip(mean, newest)]

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ring": self.ring}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.ring = state["count"], [list(snapshot) for snapshot in state["ring"]]
