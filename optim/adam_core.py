"""The Adam core shared by our Adam-family optimizers (Kingma & Ba, arXiv 1412.6980).

One place for the math every member repeats, written with torch._foreach_* ops over lists of tensors:

    m_t = b1*m_{t-1} + (1-b1)*x_t          (`ema_`; x_t is usually g_t)
    v_t = b2*v_{t-1} + (1-b2)*y_t^2        (`ema_sq_`; y_t is usually g_t)
    m_hat = m_t/(1-b1^t), v_hat = v_t/(1-b2^t)   (per tensor: each tensor keeps its own step count)
    u_t = m_hat/(sqrt(v_hat) + eps)         (`adam_denominator`: u = m/d, the same operations as torch.optim.AdamW)

and the last move of every member, `apply_update_`: optional cautious masking of u (arXiv 2411.16085), decoupled
weight decay p -= lr*wd*p (Loshchilov & Hutter, arXiv 1711.05101), optionally cautious (arXiv 2510.12402), then
p -= lr*u.

`AdamFamily` is the base class: hyperparameter checks that raise ValueError naming the bad value (`check_common`,
built on the generic checks of optim/core.py), lazy state, closure handling, and one `Batch` (params with a
gradient, their grads and states) per param group. The step count lives in each parameter's state as a Python int,
so bias corrections are host floats computed without reading any device tensor: step() never synchronises with the
device.

Speed: the rule is written once over lists and stepped per tensor on a CPU, per group elsewhere
(why: DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from optim.cautious import cautious_mask_, decay_mask
from optim.core import closure_loss, nonnegative, require

Scalar = float | Tensor  # a Python float, or a 0-dim tensor on the parameters' device (never read on the host)
Scratch = list[Tensor] | None  # views of a reused buffer (one per tensor), or None: allocate new tensors


# -- hyperparameter checks (the generic ones are in optim/core.py) ---------------------------------------------
def check_common(lr: float, betas: Sequence[float] | None = None, eps: float | None = None,
                 weight_decay: float = 0.0) -> tuple[float, float] | None:
    """Check the hyperparameters most members share; returns betas as a tuple of floats (or None)."""
    nonnegative(lr=lr, weight_decay=weight_decay)
    if eps is not None:
        nonnegative(eps=eps)
    if betas is None:
        return None
    require(len(betas) == 2, "betas", betas)
    b1, b2 = float(betas[0]), float(betas[1])
    require(0.0 <= b1 < 1.0, "beta1", b1)
    require(0.0 <= b2 < 1.0, "beta2", b2)
    return b1, b2


def adam_defaults(lr: float, betas: Sequence[float], eps: float | None, weight_decay: float, cautious: bool,
                  cautious_wd: bool, **extra: Any) -> dict[str, Any]:
    """A member's param-group defaults after `check_common`: lr, betas (floats), eps (left out when None: the
    member has none), weight_decay, the member's own `extra` hyperparameters (checked by the member) and the
    cautious options."""
    defaults: dict[str, Any] = dict(lr=lr, betas=check_common(lr, betas, eps, weight_decay))
    if eps is not None:
        defaults["eps"] = eps
    return {**defaults, "weight_decay": weight_decay, **extra, "cautious": cautious, "cautious_wd": cautious_wd}


# -- elementwise ops into scratch -----------------------------------------------------------------------------
def elementwise(op: Callable[..., Tensor], out: Scratch, *args: Any, **kwargs: Any) -> list[Tensor]:
    """[op(a[i], b[i], ..., **kwargs)] for list arguments (other arguments are passed to every call).

    With `out` (scratch views) each result is written into out[i] (op must take `out=`; an out may alias an input,
    these are elementwise ops); without, torch._foreach_<name> makes new tensors where that exists, else one call
    per tensor does."""
    if out is None:
        foreach = getattr(torch, f"_foreach_{op.__name__}", None)
        if foreach is not None:
            return list(foreach(*args, **kwargs))
    n = len(next(a for a in args if isinstance(a, list)))
    columns = [a if isinstance(a, list) else [a] * n for a in args]
    if out is None:
        return [op(*row, **kwargs) for row in zip(*columns)]
    for row, o in zip(zip(*columns), out):
        op(*row, **kwargs, out=o)
    return out


# -- the shared math ------------------------------------------------------------------------------------------
def ema_(avgs: list[Tensor], values: list[Tensor], beta: float) -> None:
    """avg = beta*avg + (1-beta)*value, in place."""
    torch._foreach_lerp_(avgs, values, 1.0 - beta)


def ema_sq_(avgs: list[Tensor], values: list[Tensor], beta: float) -> None:
    """avg = beta*avg + (1-beta)*value^2, in place."""
    torch._foreach_mul_(avgs, beta)
    torch._foreach_addcmul_(avgs, values, values, value=1.0 - beta)


def bias_corrections(beta: float, steps: Sequence[int]) -> list[float]:
    """1 - beta^t for each tensor's step t (host floats)."""
    return [1.0 - beta**t for t in steps]


def adam_denominator(exp_avg_sq: list[Tensor], betas: tuple[float, float], eps: float, steps: Sequence[int],
                     out: Scratch = None) -> list[Tensor]:
    """d = (sqrt(v)/sqrt(1-b2^t) + eps)*(1-b1^t), so that m/d = m_hat/(sqrt(v_hat) + eps) is Adam's direction
    (torch.optim.AdamW's denominator, with the first bias correction moved into it)."""
    b1, b2 = betas
    denom = elementwise(torch.sqrt, out, exp_avg_sq)
    torch._foreach_mul_(denom, [bc1 / bc2**0.5 for bc1, bc2 in zip(bias_corrections(b1, steps),
                                                                    bias_corrections(b2, steps))])
    if eps != 0.0:
        torch._foreach_add_(denom, [eps * bc1 for bc1 in bias_corrections(b1, steps)])
    return denom


def adam_direction(exp_avg: list[Tensor], exp_avg_sq: list[Tensor], betas: tuple[float, float], eps: float,
                   steps: Sequence[int], out: Scratch = None) -> list[Tensor]:
    """u = m_hat/(sqrt(v_hat) + eps), in `out` when given."""
    denom = adam_denominator(exp_avg_sq, betas, eps, steps, out)
    return elementwise(torch.div, denom if out is not None else None, exp_avg, denom)


def apply_update_(params: list[Tensor], updates: list[Tensor], grads: list[Tensor], lr: float,
                  weight_decay: Scalar = 0.0, cautious: bool = False, cautious_wd: bool = False,
                  scratch: Scratch = None, denominators: list[Tensor] | None = None) -> None:
    """p -= lr*(wd*[mask]*p + u), the last move of every decoupled-decay member.

    u is `updates`, or updates/denominators when `denominators` is given (then `updates` is left alone and the
    denominators are consumed; without cautious options the division is fused into the parameter update);
    otherwise `updates` is consumed. `scratch` holds the masks (None: allocate).

    cautious: u *= (u*g > 0)/max(mean, 1e-3) per tensor first. cautious_wd: decay only where p*u >= 0 (u after
    the cautious mask). weight_decay may be a 0-dim tensor (AdamS scales it by a whole-model statistic).
    """
    decaying = isinstance(weight_decay, Tensor) or weight_decay != 0.0
    if denominators is not None and (cautious or (decaying and cautious_wd)):
        updates = elementwise(torch.div, denominators, updates, denominators)
        denominators = None
    if cautious:
        cautious_mask_(updates, grads, scratch)
    if decaying and cautious_wd:
        masks = decay_mask(params, updates, scratch)  # the cautious mask is used up: its scratch is free
        if isinstance(weight_decay, Tensor):
            torch._foreach_mul_(masks, weight_decay * lr)
            torch._foreach_addcmul_(params, masks, params, value=-1.0)
        else:
            torch._foreach_addcmul_(params, masks, params, value=-lr * weight_decay)
    elif decaying:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    if denominators is not None:
        torch._foreach_addcdiv_(params, updates, denominators, value=-lr)
    else:
        torch._foreach_add_(params, updates, alpha=-lr)


# -- the base class -------------------------------------------------------------------------------------------
class Workspace:
    """Reused scratch buffers for a per-tensor walk over a group: slot k is one flat buffer per dtype and device,
    as large as the largest tensor, handed out as views shaped like each tensor in turn."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.buffers: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def view(self, slot: int, like: Tensor) -> Tensor:
        key = (slot, like.dtype, like.device)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty(self.numel, dtype=like.dtype, device=like.device)
        return buf[: like.numel()].view(like.shape)


@dataclass
class Batch:
    """The parameters of one group that have a gradient, with their gradients and states (same order)."""

    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Any]]
    workspace: Workspace | None = field(default=None, repr=False)

    def __bool__(self) -> bool:
        return bool(self.params)

    def buf(self, key: str) -> list[Tensor]:
        return [s[key] for s in self.states]

    @property
    def steps(self) -> list[int]:
        return [s["step"] for s in self.states]

    def scratch(self, slot: int) -> Scratch:
        """Scratch tensors shaped like the params for intermediate `slot` (0, 1, ...): reused views on the
        per-tensor path, None (allocate) on the foreach path."""
        if self.workspace is None:
            return None
        return [self.workspace.view(slot, p) for p in self.params]

    def pieces(self, per_tensor: bool | None = None) -> Iterator[Batch]:
        """The batch one tensor at a time (per_tensor; None: when every param is on the CPU), or whole."""
        if per_tensor is None:
            per_tensor = all(p.device.type == "cpu" for p in self.params)
        if not per_tensor:
            yield self
            return
        workspace = Workspace(max(p.numel() for p in self.params))
        for p, g, s in zip(self.params, self.grads, self.states):
            yield Batch([p], [g], [s], workspace)


def adam_moments_(piece: Batch, betas: tuple[float, float]) -> tuple[list[Tensor], list[Tensor]]:
    """Adam's two moments of the piece's gradients, in place: exp_avg m = b1*m + (1-b1)*g, then exp_avg_sq
    v = b2*v + (1-b2)*g^2. Returns (m, v)."""
    m, v = piece.buf("exp_avg"), piece.buf("exp_avg_sq")
    ema_(m, piece.grads, betas[0])
    ema_sq_(v, piece.grads, betas[1])
    return m, v


class AdamFamily(torch.optim.Optimizer):
    """Base of our Adam-family optimizers: lazy zero-initialised state buffers named in `state_buffers`, a
    per-tensor int step count, closure handling, and `_update(group, piece)` for every piece (`Batch.pieces`) of
    every non-empty param group. Subclasses whose rule needs whole-model statistics (AdamS) override
    `_step_batches` instead.

    `per_tensor` (attribute): None steps CPU groups one tensor at a time and other groups with foreach ops over
    the whole group; True/False force one way (the tests compare them)."""

    state_buffers: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
    per_tensor: bool | None = None

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = 0
        for key in self.state_buffers:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _batch(self, group: dict[str, Any]) -> Batch:
        batch = Batch([], [], [])
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            state["step"] += 1
            batch.params.append(p)
            batch.grads.append(p.grad)
            batch.states.append(state)
        return batch

    def _update(self, group: dict[str, Any], piece: Batch) -> None:
        raise NotImplementedError

    def _step_batches(self, batches: list[tuple[dict[str, Any], Batch]]) -> None:
        for group, batch in batches:
            if batch:
                for piece in batch.pieces(self.per_tensor):
                    self._update(group, piece)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step; returns the closure's loss (None without a closure)."""
        loss = closure_loss(closure)
        self._step_batches([(group, self._batch(group)) for group in self.param_groups])
        return loss
