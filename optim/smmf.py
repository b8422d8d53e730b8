"""SMMF: Square-Matricized Momentum Factorization (Park & Lee, arXiv 2412.08894), after the authors' code.

Every tensor (vectors and scalars too) is viewed as the matrix [n, m] with n*m = numel that is nearest to
square (m the largest divisor of numel with m <= sqrt(numel), n = numel/m). Both moments are kept
compressed between steps:

    second moment V ~ outer(r_V, c_V)               rank-1 non-negative factors
    first moment  M ~ S * outer(r_M, c_M)           factors of |M| and a 1-bit sign matrix S (8 signs a byte)

    compress(X >= 0):  r = row sums of X, c = column sums of X / sum(X)     (exact when X has rank 1)

Per step t (from 1), with G the gradient as an [n, m] matrix:

    beta1_t = beta * growth^(t-1);   beta2_t = 1 - t^decay       (beta2_1 = 0: V starts at G^2)
    M <- beta1_t * decompress(M) + (1-beta1_t) * G;   S = (M > 0), (r_M, c_M) = compress(|M|)
    V <- beta2_t * decompress(V) + (1-beta2_t) * G^2;  (r_V, c_V) = compress(V)
    p <- p*(1 - lr*wd) - lr * M / (sqrt(V) + eps)      (M, V before compression; decoupled decay)

State per [n, m] tensor: 2(n+m) floats + n*m/8 bytes, i.e. about 1/8 byte per parameter for large tensors
(Adam: 8 bytes). beta = 0 drops the first moment (update G/(sqrt(V)+eps)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from optim.core import closure_loss, groups_with_grads, nonnegative, require, unit_interval


def square_shape(numel: int) -> tuple[int, int]:
    """(n, m) with n*m = numel, m the largest divisor <= sqrt(numel) (n >= m)."""
    for m in range(math.isqrt(numel), 0, -1):
        if numel % m == 0:
            return numel // m, m
    return numel, 1  # numel == 0


def compress(x: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> None:
    """Rank-1 non-negative factors of x >= 0 into (row, col): row sums and column sums / total."""
    torch.sum(x, dim=1, out=row)
    torch.sum(x, dim=0, out=col)
    col.div_(row.sum().clamp_min(torch.finfo(row.dtype).tiny))


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, 8 to a uint8 byte (little-endian within the byte)."""
    bits = positive.reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, 8) << _shifts(bits.device)).sum(dim=1, dtype=torch.uint8)


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_PACK_MAGIC = 0x0102040810204080  # bytes 2^7..2^0: (8 little-endian 0/1 bytes as an int64 * this) >> 56 packs them


def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 8]: row b holds +1 where bit k of b is set, else -1 (the signs of a packed byte)."""
    key = (dtype, device)
    if key not in _SIGN_TABLES:
        byte = torch.arange(256, device=device).unsqueeze(1)
        bits = (byte >> torch.arange(8, device=device)) & 1
        _SIGN_TABLES[key] = (bits * 2 - 1).to(dtype)
    return _SIGN_TABLES[key]


class _Scratch:
    """Reused flat buffers, one per (slot, dtype, device), as large as the largest (padded) tensor of a group."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, slot: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (slot, dtype, device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(self.numel, dtype=dtype, device=device)
        return self.buffers[key]


class SMMF(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, beta: float = 0.9, eps: float = 1e-8,
                 weight_decay: float = 0.0, decay: float = -0.5, growth: float = 0.999) -> None:
        nonnegative(lr=lr)
        unit_interval(beta=beta)
        nonnegative(eps=eps, weight_decay=weight_decay)
        require(-1.0 <= decay <= 0.0, "decay", decay, "want -1 <= decay <= 0")
        require(0.0 <= growth <= 1.0, "growth", growth, "want 0 <= growth <= 1")
        super().__init__(params, dict(lr=lr, beta=beta, eps=eps, weight_decay=weight_decay, decay=decay,
                                      growth=growth))

    def _init_state(self, p: torch.Tensor, first_moment: bool) -> dict[str, Any]:
        state = self.state[p]
        n, m = square_shape(p.numel())
        kw = dict(dtype=p.dtype, device=p.device)
        if not state:
            state["step"] = 0
            state["v_row"], state["v_col"] = torch.zeros(n, **kw), torch.zeros(m, **kw)
        if first_moment and "m_row" not in state:
            state["m_row"], state["m_col"] = torch.zeros(n, **kw), torch.zeros(m, **kw)
            state["m_sign"] = torch.zeros((n * m + 7) // 8, dtype=torch.uint8, device=p.device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # casts all state to the params' dtype: signs back to bytes
        for state in self.state.values():
            if "m_sign" in state:
                state["m_sign"] = state["m_sign"].to(torch.uint8)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = closure_loss(closure)
        for group, params in groups_with_grads(self):
            lr, eps, wd, beta1 = group["lr"], group["eps"], group["weight_decay"], group["beta"]
            # Each tensor has its own square shape: one tensor at a time while it is in cache, every
            # intermediate in reused scratch buffers (no model-sized allocation per step).
            work = _Scratch(max(p.numel() + 7 for p in params) // 8 * 8)
            for p in params:
                if wd != 0:
                    p.mul_(1.0 - lr * wd)
                state = self._init_state(p, beta1 > 0)
                state["step"] += 1
                t = state["step"]
                n, m = state["v_row"].numel(), state["v_col"].numel()
                numel = n * m
                g = p.grad.reshape(n, m)
                beta2_t = 1.0 - t ** group["decay"]
                v = work.get(0, p.dtype, p.device)[:numel].view(n, m)
                torch.mul(state["v_row"].view(n, 1), state["v_col"].view(1, m), out=v)
                v.mul_(beta2_t).addcmul_(g, g, value=1 - beta2_t)
                compress(v, state["v_row"], state["v_col"])
                if beta1 > 0:
                    beta1_t = beta1 * group["growth"] ** (t - 1)
                    packed = state["m_sign"]
                    mom = work.get(1, p.dtype, p.device)[: packed.numel() * 8]
                    # the old signs as +-1 (one table row per packed byte), times the old magnitude
                    torch.index_select(_sign_table(p.dtype, p.device), 0, packed.long(), out=mom.view(-1, 8))
                    mom = mom[:numel].view(n, m)
                    mom.mul_(state["m_row"].view(n, 1)).mul_(state["m_col"].view(1, m))
                    mom.mul_(beta1_t).add_(g, alpha=1 - beta1_t)
                    positive = work.get(2, torch.bool, p.device)[: packed.numel() * 8]
                    positive[numel:].zero_()
                    torch.gt(mom.view(-1), 0, out=positive[:numel])
                    words = work.get(4, torch.int64, p.device)[: packed.numel()]
                    torch.mul(positive.view(torch.int64), _PACK_MAGIC, out=words).bitwise_right_shift_(56)
                    packed.copy_(words)  # the low byte of each word: its 8 signs, little-endian
                    magnitude = work.get(3, p.dtype, p.device)[:numel].view(n, m)
                    compress(torch.abs(mom, out=magnitude), state["m_row"], state["m_col"])
                else:
                    mom = g
                v.sqrt_().add_(eps)
                if p.is_contiguous():
                    p.view(n, m).addcdiv_(mom, v, value=-lr)
                else:
                    p.add_(v.reciprocal_().mul_(mom).view_as(p), alpha=-lr)
        return loss
