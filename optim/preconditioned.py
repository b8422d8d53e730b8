"""SOAP and Shampoo for the hidden weights, AdamW for the rest (optim/split.py), from pytorch_optimizer.

SOAP (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321): Adam run in the
eigenbasis of Shampoo's factors L = EMA(G G^T), R = EMA(G^T G), the basis refreshed every
`precondition_frequency` steps by one power iteration + QR (the authors' nikhilvyas/SOAP soap.py).
Shampoo (Gupta, Koren & Singer, arXiv 1802.09568): P = L^{-1/4} G R^{-1/4} with L = eps I + sum G G^T,
R = eps I + sum G^T G; for a k-D tensor one factor per dimension and the root 1/(2k).

Library: pytorch_optimizer (pytorch_optimizer.SOAP, pytorch_optimizer.Shampoo), not heavyball (both read at the
pinned versions, 4.1.0 and 3.2.1), because
- fidelity: pytorch_optimizer's SOAP is the authors' soap.py step for step, with their defaults; it keeps the first
  moment in the original space and projects it every step, which equals the authors' current rotate-on-refresh
  form up to rounding, the bases being orthogonal (tests/optim/test_preconditioned.py: 4.5e-7 over 9 steps).
  heavyball's SOAP has other defaults and extras (precondition_frequency 2, merge_dims on, max_precond_dim 2048,
  betas 0.9/0.95, a preconditioner-update schedule, beta2_scale) and no plain Shampoo (KL-Shampoo only);
- CPUs: pytorch_optimizer steps eagerly; heavyball describes itself as compile-first (torch.compile fusion);
- state: pytorch_optimizer's SOAP and Shampoo keep plain tensors and numbers in state and param groups, so
  state_dict round-trips exactly (tested here and through a resumed run in tests/test_resume.py);
- releases: both are maintained (latest: pytorch_optimizer 4.1.0, 2026-10; heavyball 3.2.1, 2026-08).
facebookresearch/optimizers' Distributed Shampoo (the AlgoPerf winner) is not on a package index. Its rule with
betas=(0, 1), grafting off, precondition_frequency=1, start_preconditioning_step=1, decoupled weight decay and
tensors no larger than max_preconditioner_dim is what pytorch_optimizer's Shampoo computes (tests/optim/
test_preconditioned.py checks it); its grafting, beta2 < 1, first-moment filtering and blocking are not here, and
pytorch_optimizer's own `momentum` option (a mix of g with the last preconditioned step, written into p.grad) is
not exposed.

Routing as Muon's: >= 2-D hidden weights (and untagged tensors) to the method, 1-D tensors, embeddings and the
output head to torch.optim.AdamW; a group forces its tensors with `use_preconditioner: True/False`.

Host synchronisation on GPUs (torch documents it for torch.linalg.eigh and svd): SOAP's eigh runs at each tensor's
first step only, its refreshes are matrix products and a QR; Shampoo takes an SVD of every factor at every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import pytorch_optimizer
import torch

from optim.core import beta_pair, nonnegative, require, unit_interval
from optim.split import SplitOptimizer, is_hidden_matrix

FORCE_KEY = "use_preconditioner"


def routes_to_preconditioner(p: torch.Tensor, group: dict[str, Any]) -> bool:
    """True for a >= 2-D hidden weight (or untagged tensor), unless the group says otherwise."""
    return is_hidden_matrix(p, group, FORCE_KEY, max_dim=None)


def routes_to_shampoo(p: torch.Tensor, group: dict[str, Any]) -> bool:
    """As routes_to_preconditioner, for tensors whose every dimension is at most max_preconditioner_dim."""
    return routes_to_preconditioner(p, group) and max(p.shape) <= group["max_preconditioner_dim"]


class SOAP(SplitOptimizer):
    """pytorch_optimizer.SOAP on the hidden weights; AdamW with the same lr, betas, eps and weight decay on the
    rest. Weight decay is decoupled on both halves (the authors' p -= lr*wd*p after the step)."""

    side = "soap"
    SOAP_KEYS = {"lr": "lr", "betas": "betas", "shampoo_beta": "shampoo_beta", "eps": "eps",
                 "weight_decay": "weight_decay", "precondition_frequency": "precondition_frequency",
                 "normalize_gradient": "normalize_gradient", "correct_bias": "correct_bias"}
    ADAMW_KEYS = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"}

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: Sequence[float] = (0.95, 0.95),
                 shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precondition_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, normalize_gradient: bool = False, correct_bias: bool = True) -> None:
        betas = tuple(float(b) for b in betas)
        nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
        beta_pair("betas", betas)
        if shampoo_beta is not None:
            unit_interval(shampoo_beta=shampoo_beta)
        for key, value in (("precondition_frequency", precondition_frequency),
                           ("max_precondition_dim", max_precondition_dim)):
            require(isinstance(value, int) and value >= 1, key, value, "want an int >= 1")
        make = partial(pytorch_optimizer.SOAP, max_precondition_dim=max_precondition_dim, merge_dims=merge_dims,
                       precondition_1d=precondition_1d)
        super().__init__(params, dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                                      weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                                      normalize_gradient=normalize_gradient, correct_bias=correct_bias),
                         routes=routes_to_preconditioner, make_matrix=make, matrix_keys=self.SOAP_KEYS,
                         adamw_keys=self.ADAMW_KEYS)


class Shampoo(SplitOptimizer):
    """pytorch_optimizer.Shampoo (decoupled weight decay) on the hidden weights with no dimension above
    max_preconditioner_dim (Distributed Shampoo's default 1024; it splits larger tensors into blocks, the package
    cannot, so they go to AdamW: a d x d root every step costs O(d^3)); AdamW on the rest, at lr * adamw_lr_ratio
    (Shampoo's step L^{-1/4} G R^{-1/4} has a spectral, not an elementwise, scale: its entries are
    ~1/sqrt(rows*cols) where Adam's are ~1)."""

    side = "shampoo"
    SHAMPOO_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "matrix_eps": "matrix_eps"}
    ADAMW_KEYS = {"lr": lambda g: g["lr"] * g["adamw_lr_ratio"], "weight_decay": "weight_decay",
                  "betas": "adamw_betas", "eps": "adamw_eps"}

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, weight_decay: float = 0.0,
                 matrix_eps: float = 1e-12, max_preconditioner_dim: int = 1024, adamw_lr_ratio: float = 0.1,
                 adamw_betas: Sequence[float] = (0.9, 0.999), adamw_eps: float = 1e-8) -> None:
        adamw_betas = tuple(float(b) for b in adamw_betas)
        nonnegative(lr=lr, weight_decay=weight_decay, matrix_eps=matrix_eps, adamw_lr_ratio=adamw_lr_ratio,
                    adamw_eps=adamw_eps)
        beta_pair("adamw_betas", adamw_betas)
        require(isinstance(max_preconditioner_dim, int) and max_preconditioner_dim >= 1, "max_preconditioner_dim",
                max_preconditioner_dim, "want an int >= 1")
        # roots every step: the package's preconditioning_compute_steps > 1 leaves the roots at zero (no step at
        # all) until the first computation
        make = partial(pytorch_optimizer.Shampoo, momentum=0.0, weight_decouple=True, fixed_decay=False,
                       preconditioning_compute_steps=1)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, matrix_eps=matrix_eps,
                                      max_preconditioner_dim=max_preconditioner_dim, adamw_lr_ratio=adamw_lr_ratio,
                                      adamw_betas=adamw_betas, adamw_eps=adamw_eps),
                         routes=routes_to_shampoo, make_matrix=make, matrix_keys=self.SHAMPOO_KEYS,
                         adamw_keys=self.ADAMW_KEYS)
