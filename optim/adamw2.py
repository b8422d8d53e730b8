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

Which tensors: every parameter with >= 2 dimensions, viewed as a matrix [shape[0], -1] (a Linear weight as it is, a
conv kernel by output channel). Vectors and scalars (biases, norm weights) take the plain AdamW step.

sigma_1 by warm-started power iteration; matrices of one shape are stepped as a stack (sources, cost:
DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from optim.adam_core import AdamFamily, Batch, adam_defaults, adam_direction, adam_moments_, apply_update_
from optim.cautious import cautious_mask_, decay_mask
from optim.core import int_at_least, positive

FIRST_STEP_ITERS = 10  # power iterations at the first step, from the fixed start vector
VECTOR_KEYS = ("sigma_w_vec", "sigma_u_vec")


def as_matrix(t: Tensor) -> Tensor:
    """The [shape[0], -1] view of a >= 2-D tensor."""
    return t.reshape(t.shape[0], -1)


def top_singular_value(a: Tensor, v: Tensor, iters: int) -> Tensor:
    """sigma_1 of a matrix [m, n], or of each matrix of a stack [B, m, n], by `iters` (>= 1) power iterations on
    a^T a from the unit vector v ([n] or [B, n], updated in place to the new right singular vector estimates); a
    0-dim tensor, or [B]. The estimate is sqrt(||a^T a v||) for the last v before its update: for a unit v it is at
    most sigma_1 and at least ||a v|| (Cauchy-Schwarz), and it costs no product of its own. A zero matrix gives 0
    and leaves its vector unchanged."""
    stacked = a.dim() == 3
    a, vec = (a, v) if stacked else (a.unsqueeze(0), v.unsqueeze(0))
    for _ in range(iters):
        # Row vectors (v^T a^T, then x^T a): on CPU these batched products run as matrix kernels, about 7x faster
        # than the column form a v.
        w = torch.bmm(torch.bmm(vec.unsqueeze(1), a.mT), a).squeeze(1)
        norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        vec.copy_(torch.where(norm > 0, w / norm, vec))
    sigma = norm.squeeze(-1).sqrt()
    return sigma if stacked else sigma[0]


def start_vector(n: int, like: Tensor) -> Tensor:
    """A fixed pseudo-random unit vector of length n (the same for every run)."""
    g = torch.Generator().manual_seed(n)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    return (v / torch.linalg.vector_norm(v)).to(dtype=like.dtype, device=like.device)


@dataclass
class Bucket:
    """Same-shaped matrices of a group, stepped together: `stack` [2B, rows, cols] holds their directions u in its
    first half and working copies of the weights in its second; `w` are the copies' slices shaped like the params."""

    idx: list[int]
    stack: Tensor
    w: list[Tensor]


@dataclass
class Layout:
    """How a group's params are stepped: `key` (the params' ids) tells when it must be rebuilt; `out` is where
    adam_direction writes u for each param (matrices into their bucket's stack, vectors into one flat buffer)."""

    key: tuple[int, ...]
    buckets: list[Bucket]
    vectors: list[int]
    out: list[Tensor]


def layout(params: list[Tensor]) -> Layout:
    """Buckets of the >= 2-D params by matrix shape ([shape[0], -1]), dtype and device; the rest are vectors."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        if p.ndim >= 2:
            groups.setdefault((p.shape[0], p[0].numel(), p.dtype, p.device), []).append(i)
    out: list[Tensor | None] = [None] * len(params)
    buckets = []
    for (rows, cols, dtype, device), idx in groups.items():
        stack = torch.empty(2 * len(idx), rows, cols, dtype=dtype, device=device)
        for k, i in enumerate(idx):
            out[i] = stack[k].view(params[i].shape)
        buckets.append(Bucket(idx, stack, [stack[len(idx) + k].view(params[i].shape) for k, i in enumerate(idx)]))
    vectors = [i for i, p in enumerate(params) if p.ndim < 2]
    for i in vectors:
        out[i] = torch.empty_like(params[i])
    return Layout(tuple(id(p) for p in params), buckets, vectors, out)  # type: ignore[arg-type]


class AdamW2(AdamFamily):
    """AdamW with the per-matrix step bound lr * sigma_1(u) <= tau * sigma_1(W)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, tau: float = 0.1, power_iters: int = 1,
                 cautious: bool = False, cautious_wd: bool = False) -> None:
        positive(tau=tau)
        int_at_least("power_iters", power_iters, 1)
        super().__init__(params, adam_defaults(lr, betas, eps, weight_decay, cautious, cautious_wd, tau=tau,
                                               power_iters=power_iters))
        self._layouts: dict[int, Layout] = {}  # per group index; buffers, not state

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        super()._init_state(p, state)
        if p.ndim >= 2:
            for key in VECTOR_KEYS:
                state[key] = start_vector(as_matrix(p).shape[1], p)

    def _step_batches(self, batches: list[tuple[dict[str, Any], Batch]]) -> None:
        # One piece per group on every device: the bound works on the same-shaped matrices side by side.
        for index, (group, batch) in enumerate(batches):
            if not batch:
                continue
            plan = self._layouts.get(index)
            if plan is None or plan.key != tuple(id(p) for p in batch.params):
                plan = self._layouts[index] = layout(batch.params)
            self._step_group(group, batch, plan)

    def _step_group(self, group: dict[str, Any], batch: Batch, plan: Layout) -> None:
        params, states = batch.params, batch.states
        lr, wd = group["lr"], group["weight_decay"]
        m, v = adam_moments_(batch, group["betas"])
        u = adam_direction(m, v, group["betas"], group["eps"], batch.steps, plan.out)
        if group["cautious"]:
            cautious_mask_(u, batch.grads)
        cautious_wd = wd != 0 and group["cautious_wd"]

        for bucket in plan.buckets:
            count, ps = len(bucket.idx), [params[i] for i in bucket.idx]
            torch._foreach_copy_(bucket.w, ps)
            rate = self._rate(group, [states[i] for i in bucket.idx], bucket.stack).view(count, 1, 1)
            weights, step = bucket.stack[count:], bucket.stack[:count]
            # p <- p - rate*(wd*[mask]*p + u), on the copies, then back into the params
            if cautious_wd:  # decay only where p*u >= 0
                decay = decay_mask([weights], [step])[0].mul_(weights)
                weights.addcmul_(decay, rate * wd, value=-1.0)
            elif wd != 0:
                weights.mul_(1.0 - wd * rate)
            weights.addcmul_(step, rate, value=-1.0)
            torch._foreach_copy_(ps, bucket.w)

        if plan.vectors:  # AdamW's step (u is already masked when cautious)
            apply_update_([params[i] for i in plan.vectors], [u[i] for i in plan.vectors], [], lr, wd,
                          cautious_wd=group["cautious_wd"])

    def _rate(self, group: dict[str, Any], states: list[dict[str, Any]], stack: Tensor) -> Tensor:
        """min(lr, tau*sigma_1(W)/sigma_1(u)) for each matrix of a bucket (`stack`: u's then W's), a [B] tensor;
        lr where either is 0 (a zero matrix, e.g. zero-initialised, has no scale to bound its step by, and u = 0
        moves nothing): the where discards the inf/nan there."""
        vectors = [s["sigma_u_vec"] for s in states] + [s["sigma_w_vec"] for s in states]
        stacked = torch.stack(vectors)
        first = any(s["step"] == 1 for s in states)
        iters = max(FIRST_STEP_ITERS, group["power_iters"]) if first else group["power_iters"]
        sigma = top_singular_value(stack, stacked, iters)
        torch._foreach_copy_(vectors, list(stacked.unbind(0)))
        sigma_u, sigma_w = sigma.chunk(2)
        lr = group["lr"]
        bounded = (sigma_w > 0) & (sigma_u > 0)
        return torch.where(bounded, torch.clamp(group["tau"] * sigma_w / sigma_u, max=lr), lr)
