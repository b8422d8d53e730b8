"""AdamW^2: AdamW whose step is bounded per weight matrix so that training needs no learning-rate warmup (Qi et al.,
"Taming Transformer Without Using Learning Rate Warmup", ICLR 2025, arXiv 2505.21910).

The paper traces warmup-free crashes to "spectral energy concentration": a few top singular values of the weight
matrices (W_q^T W_k above all) grow so fast in the first steps that attention collapses. By Weyl's inequality,
sigma_1(W_t) <= sigma_1(W_{t-1}) + alpha_t * sigma_1(Delta W_t), so bounding the step per matrix,

    alpha_t = min(lr, tau * sigma_1(W_{t-1}) / sigma_1(Delta W_t)),

keeps sigma_1(W_t) <= (1 + tau) * sigma_1(W_{t-1}): the top singular value of no matrix grows by more than a
factor 1 + tau per step, whatever the learning rate. Delta W_t is AdamW's update direction
u = m_hat/(sqrt(v_hat) + eps) (Kingma & Ba 1412.6980); the step is p <- p - alpha_t * (u + wd*p), AdamW's
(Loshchilov & Hutter 1711.05101) with alpha_t in place of lr; options `cautious` (the bound then applies to the
masked u; arXiv 2411.16085) and `cautious_wd` (arXiv 2510.12402) as in optim/cautious.py.

Sources: the paper's abstract states the rule per weight matrix (if sigma_1(Delta W_t)/sigma_1(W_{t-1}) exceeds a
threshold, the learning rate is bounded to a multiple tau of sigma_1(W_{t-1})/sigma_1(Delta W_t)); its full text
(Algorithm 1) could not be read from here, and the authors publish no code. The seed document (002) reads the
rule as one global learning-rate factor computed from all layers; we follow the paper's per-matrix statement.

Which tensors: every parameter with >= 2 dimensions, viewed as a matrix [shape[0], -1] (a Linear weight as it is, a
conv kernel by output channel). Vectors and scalars (biases, norm weights) take the plain AdamW step.

sigma_1 of W and of u by power iteration (v <- A^T A v / ||A^T A v||, sigma_1 ~ ||A v||), warm-started: each
matrix keeps a right singular vector estimate for W and one for u in its state, so `power_iters` iterations per
step (default 1) track the slowly moving top singular pair; the first step runs at least FIRST_STEP_ITERS (10)
from a fixed pseudo-random start (deterministic, so a run and its resumption agree). An underestimate of
sigma_1(u) would loosen the bound exactly when it matters, at the first step, hence the longer first run.

Cost: per matrix and step, 2 matrix-vector products per power iteration for W and 2 for u (about 4 passes over the
matrix at power_iters=1, on top of AdamW's), plus state of AdamW's 2 moments and two vectors of the column count
(bench/optimizers.py: step time and state bytes against torch.optim.AdamW). Everything stays on the device: the
ratio and the min are 0-dim tensors, no host synchronisation. A matrix whose sigma_1 is 0 (zero-initialised) has
no scale to bound its step by and takes AdamW's step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from optim.adam_core import AdamFamily, Batch, adam_defaults, adam_direction, adam_moments_
from optim.cautious import cautious_mask_, decay_mask
from optim.core import int_at_least, positive

FIRST_STEP_ITERS = 10  # power iterations at the first step, from the fixed start vector
VECTOR_KEYS = ("sigma_w_vec", "sigma_u_vec")


def as_matrix(t: Tensor) -> Tensor:
    """The [shape[0], -1] view of a >= 2-D tensor."""
    return t.reshape(t.shape[0], -1)


def top_singular_value(a: Tensor, v: Tensor, iters: int) -> Tensor:
    """sigma_1(a) by `iters` power iterations on a^T a from v (updated in place to the new right singular vector
    estimate); a 0-dim tensor. A zero matrix gives 0 and leaves v unchanged."""
    for _ in range(iters):
        w = a.T @ (a @ v)
        norm = torch.linalg.vector_norm(w)
        v.copy_(torch.where(norm > 0, w / norm, v))
    return torch.linalg.vector_norm(a @ v)


def start_vector(n: int, like: Tensor) -> Tensor:
    """A fixed pseudo-random unit vector of length n (the same for every run)."""
    g = torch.Generator().manual_seed(n)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    return (v / torch.linalg.vector_norm(v)).to(dtype=like.dtype, device=like.device)


class AdamW2(AdamFamily):
    """AdamW with the per-matrix step bound lr * sigma_1(u) <= tau * sigma_1(W)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, tau: float = 0.1, power_iters: int = 1,
                 cautious: bool = False, cautious_wd: bool = False) -> None:
        positive(tau=tau)
        int_at_least("power_iters", power_iters, 1)
        super().__init__(params, adam_defaults(lr, betas, eps, weight_decay, cautious, cautious_wd, tau=tau,
                                               power_iters=power_iters))

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        super()._init_state(p, state)
        if p.ndim >= 2:
            for key in VECTOR_KEYS:
                state[key] = start_vector(as_matrix(p).shape[1], p)

    def _update(self, group: dict[str, Any], piece: Batch) -> None:
        m, v = adam_moments_(piece, group["betas"])
        u = adam_direction(m, v, group["betas"], group["eps"], piece.steps, piece.scratch(0))
        if group["cautious"]:
            cautious_mask_(u, piece.grads, piece.scratch(1))
        lr, wd = group["lr"], group["weight_decay"]
        masks = decay_mask(piece.params, u, piece.scratch(1)) if wd != 0 and group["cautious_wd"] else None
        for i, (p, step, state) in enumerate(zip(piece.params, u, piece.states)):
            rate: float | Tensor = lr
            if p.ndim >= 2:
                iters = max(FIRST_STEP_ITERS, group["power_iters"]) if state["step"] == 1 else group["power_iters"]
                sigma_w = top_singular_value(as_matrix(p), state["sigma_w_vec"], iters)
                sigma_u = top_singular_value(as_matrix(step), state["sigma_u_vec"], iters)
                # min(lr, tau*sigma_w/sigma_u); lr where either is 0 (a zero matrix, e.g. zero-initialised, has no
                # scale to bound its step by, and u = 0 moves nothing): the where discards the inf/nan there.
                bounded = (sigma_w > 0) & (sigma_u > 0)
                rate = torch.where(bounded, torch.clamp(group["tau"] * sigma_w / sigma_u, max=lr), lr)
            if masks is not None:  # decay only where p*u >= 0 (cautious weight decay)
                decay = masks[i].mul_(p)
                p.addcmul_(decay, rate, value=-wd) if isinstance(rate, Tensor) else p.add_(decay, alpha=-lr * wd)
            elif wd != 0:
                p.mul_(1.0 - rate * wd)
            if isinstance(rate, Tensor):
                p.addcmul_(step, rate, value=-1.0)
            else:
                p.add_(step, alpha=-lr)
