"""Muon for hidden matrices + AdamW for everything else, as one optimizer (Liu et al., "Muon is Scalable for
LLM Training", arXiv 2502.16982; Muon: Jordan et al. 2024, kellerjordan.github.io/posts/muon).

Muon orthogonalizes the (Nesterov) momentum of a 2-D weight with a quintic Newton-Schulz iteration:

    B <- mu*B + g;   O = NS5(g + mu*B)  (nesterov) or NS5(B);   p <- p*(1 - lr*wd) - lr*s*O

It is defined for the weight matrices of hidden layers only. This optimizer splits the param groups it is
given (optim/split.py, shared with SOAP and Shampoo): every 2-D parameter whose role (optim/param_groups.py) is
"hidden", or that was never tagged, goes to the Muon half (torch.optim.Muon's rule); everything else goes to
torch.optim.AdamW: biases, norm weights, scalars, embeddings, the output head (a module marked
`is_output_head = True`, else the model's last nn.Linear) and >2-D tensors such as conv filters (torch's Muon
takes 2-D only). A group may force its 2-D params with `use_muon: True/False`.

With adjust_lr_fn="match_rms_adamw" (default; the paper's rule s = 0.2*sqrt(max(rows, cols))) Muon's update
has AdamW's RMS, so both halves share one lr and one weight decay, as in the paper; the AdamW half uses
`adamw_betas` and `adamw_eps`. Each incoming group keeps its own hyperparameters (a no_decay group stays
undecayed on both halves), and a schedule or GradScaler acting on this optimizer's param_groups reaches both
halves: their hyperparameters are copied from the group they came from at every step. state_dict holds both.

`ns_dtype="auto"` (default) runs Newton-Schulz in bfloat16 where bf16 products are native (accelerators, CPUs
with a bf16 instruction set) and in float32 elsewhere (why: DESIGN.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from optim.core import beta_pair, closure_loss, nonnegative, one_of, require, unit_interval
from optim.split import SplitOptimizer, is_hidden_matrix

MUON_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum", "nesterov": "nesterov",
             "ns_steps": "ns_steps", "adjust_lr_fn": "adjust_lr_fn", "ns_dtype": "ns_dtype"}
ADAMW_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "betas": "adamw_betas", "eps": "adamw_eps"}
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")
NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
# CPU features with bfloat16 dot products in hardware: x86 AVX512-BF16 and AMX-BF16 (what oneDNN's bf16 matmuls
# use), Arm's BF16 extension (BFDOT/BFMMLA) and SVE-BF16.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (read once: cpuinfo's flags through torch)."""
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(flag, False) for flag in NATIVE_BF16_CPU_FLAGS)


def orthogonalization_dtype(device: torch.device, ns_dtype: str = "auto") -> torch.dtype:
    """The dtype Newton-Schulz runs in for parameters on `device`: `ns_dtype` when forced; with "auto",
    bfloat16 on accelerators (CUDA, XPU: bf16 matrix units) and on CPUs with native bf16, float32 elsewhere
    (CPUs that emulate bf16, MPS)."""
    forced = NS_DTYPES[ns_dtype]
    if forced is not None:
        return forced
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32 if device.type == "mps" else torch.bfloat16


def newton_schulz(g: torch.Tensor, steps: int, dtype: torch.dtype,
                  coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
                  eps: float = 1e-7) -> torch.Tensor:
    """Jordan's quintic Newton-Schulz iteration (kellerjordan.github.io/posts/muon), in `dtype`:
    X = G/||G||_F (transposed when tall, so X X^T is the small Gram matrix), then `steps` times
    X <- aX + (bA + cA^2)X with A = XX^T. Each step maps every singular value s of X to as + bs^3 + cs^5 and
    keeps the singular vectors, so the result is about U V^T (singular values in roughly [0.7, 1.2]).
    A matrix [m, n] goes through the same operations as torch.optim.Muon's (which fixes dtype to bfloat16); a
    stack [B, m, n] is iterated as B independent matrices with batched products."""
    a, b, c = coefficients
    x = g.to(dtype=dtype, copy=True)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    if x.dim() == 2:
        x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm = 1
        for _ in range(steps):
            gram = x @ x.T
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # bA + cA^2
            x = torch.addmm(x, poly, x, beta=a)  # aX + (bA + cA^2)X
    else:
        x.div_(torch.linalg.matrix_norm(x).clamp(min=eps)[:, None, None])
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's update scale for a [A, B] matrix (torch.optim.Muon's rules): "original" sqrt(max(1, A/B))
    (Jordan), "match_rms_adamw" 0.2 sqrt(max(A, B)) (AdamW's update RMS, 2502.16982), "spectral_unclamped"
    sqrt(A/B) (Bernstein, "Deriving Muon")."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(rows / cols)


def _decay_and_step(p: torch.Tensor, o: torch.Tensor, group: dict[str, Any]) -> None:
    """p <- p (1 - lr wd) - lr s O, with Muon's scale s for p's shape."""
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.add_(o, alpha=-adjusted_lr(group["lr"], group["adjust_lr_fn"], p.shape))


class MuonHalf(torch.optim.Muon):
    """torch.optim.Muon (its constructor, checks, defaults and state layout) with the Newton-Schulz dtype as
    the group option `ns_dtype`; step() is torch's single-tensor step with that dtype."""

    def __init__(self, params: Iterable[Any], ns_dtype: str = "auto", **kwargs: Any) -> None:
        one_of("ns_dtype", ns_dtype, tuple(NS_DTYPES))
        super().__init__(params, **kwargs)
        self.defaults["ns_dtype"] = ns_dtype
        for group in self.param_groups:
            group.setdefault("ns_dtype", ns_dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = closure_loss(closure)
        for group in self.param_groups:
            mu = group["momentum"]
            # float32 work is stacked by oriented shape (a tall matrix transposed, as Newton-Schulz iterates it):
            # one batched iteration per shape instead of one per matrix. bfloat16 stays torch's, matrix by matrix.
            stacks: dict[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mu)  # the EMA form: mu*buf + (1 - mu)*g
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                dtype = orthogonalization_dtype(p.device, group.get("ns_dtype", "auto"))
                if dtype == torch.float32:
                    key = (min(p.shape), max(p.shape), p.dtype, p.device)
                    stacks.setdefault(key, []).append((p, update.mT if p.size(0) > p.size(1) else update))
                    continue
                o = newton_schulz(update, group["ns_steps"], dtype, group["ns_coefficients"], group["eps"])
                _decay_and_step(p, o, group)
            for items in stacks.values():
                ortho = newton_schulz(torch.stack([u for _, u in items]), group["ns_steps"], torch.float32,
                                      group["ns_coefficients"], group["eps"])
                for (p, _), o in zip(items, ortho):
                    _decay_and_step(p, o.mT if p.size(0) > p.size(1) else o, group)
        return loss


def routes_to_muon(p: torch.Tensor, group: dict[str, Any]) -> bool:
    """True when p belongs to Muon: a 2-D tensor that is a hidden weight (or untagged), unless the group
    says otherwise with `use_muon`."""
    return is_hidden_matrix(p, group, "use_muon")


class Muon(SplitOptimizer):
    side = "muon"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr_fn: str | None = "match_rms_adamw", adamw_betas: Sequence[float] = (0.9, 0.95),
                 adamw_eps: float = 1e-8, ns_dtype: str = "auto") -> None:
        adamw_betas = tuple(float(b) for b in adamw_betas)
        nonnegative(lr=lr, weight_decay=weight_decay)
        unit_interval(momentum=momentum)
        require(isinstance(ns_steps, int) and 1 <= ns_steps < 100, "ns_steps", ns_steps, "want an int in [1, 100)")
        one_of("adjust_lr_fn", adjust_lr_fn, ADJUST_LR_FNS)
        one_of("ns_dtype", ns_dtype, tuple(NS_DTYPES))
        beta_pair("adamw_betas", adamw_betas)
        nonnegative(adamw_eps=adamw_eps)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, adamw_betas=adamw_betas,
                                      adamw_eps=adamw_eps, ns_dtype=ns_dtype),
                         routes=routes_to_muon, make_matrix=MuonHalf, matrix_keys=MUON_KEYS, adamw_keys=ADAMW_KEYS)
