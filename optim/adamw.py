"""AdamW (Loshchilov & Hutter, arXiv 1711.05101) with optional cautious masking and cautious weight decay.

    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  u = m_hat/(sqrt(v_hat) + eps)
    p <- p - lr*wd*p - lr*u

cautious=True masks u where it disagrees with g and rescales it (arXiv 2411.16085); cautious_wd=True decays only
where p*u >= 0 (arXiv 2510.12402); see optim/cautious.py.

`adamw(...)` is the config factory (conf/optimizer/adamw.yaml): it returns torch.optim.AdamW, with its fused/foreach
kernels, when neither cautious option is on, and our `AdamW` (the shared Adam core of optim/adam_core.py) otherwise.
With both options off our AdamW follows torch.optim.AdamW's rule (tests/optim/test_adam_family.py compares them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from optim.adam_core import AdamFamily, Batch, adam_defaults, adam_denominator, adam_moments_, apply_update_
from optim.core import require


class AdamW(AdamFamily):
    """AdamW with `cautious` and `cautious_wd` options (per param group)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, cautious: bool = False,
                 cautious_wd: bool = False) -> None:
        super().__init__(params, adam_defaults(lr, betas, eps, weight_decay, cautious, cautious_wd))

    def _update(self, group: dict[str, Any], piece: Batch) -> None:
        m, v = adam_moments_(piece, group["betas"])
        denom = adam_denominator(v, group["betas"], group["eps"], piece.steps, piece.scratch(0))
        apply_update_(piece.params, m, piece.grads, group["lr"], group["weight_decay"], group["cautious"],
                      group["cautious_wd"], piece.scratch(1), denominators=denom)


# torch.optim.AdamW flags that change the rule or the autograd contract; our AdamW implements none of them.
TORCH_ONLY_FLAGS = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}


def adamw(params: Iterable[Any], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
          foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
          fused: bool | None = None, cautious: bool = False, cautious_wd: bool = False,
          **torch_options: Any) -> torch.optim.Optimizer:
    """torch.optim.AdamW when cautious and cautious_wd are both off, else our AdamW.

    Every keyword of torch.optim.AdamW (amsgrad, maximize, foreach, capturable, differentiable, fused, and any
    other in `torch_options`) is passed through to torch's. With a cautious option on:
    * amsgrad, maximize, capturable and differentiable set to True (and any other torch keyword) raise ValueError
      naming them: our AdamW's rule has no such variant;
    * `foreach` picks our AdamW's path: False steps one tensor at a time, True runs foreach ops over whole groups,
      None chooses by device (per tensor on CPU; see optim/adam_core.py);
    * `fused` is ignored: there is no fused kernel for the cautious rule, and a recipe that asks for torch's fused
      AdamW (recipes/char_transformer_gpu.yaml) can switch a cautious option on without editing it.
    """
    require(lr > 0, "learning rate", lr, "want > 0")
    if not cautious and not cautious_wd:
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                 amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                                 differentiable=differentiable, fused=fused, **torch_options)
    flags = dict(amsgrad=amsgrad, maximize=maximize, capturable=capturable, differentiable=differentiable)
    unsupported = [f"{k}={v}" for k, v in flags.items() if v != TORCH_ONLY_FLAGS[k]]
    unsupported += [f"{k}={v}" for k, v in torch_options.items()]
    if unsupported:
        on = " and ".join(k for k, v in (("cautious", cautious), ("cautious_wd", cautious_wd)) if v)
        raise ValueError(f"adamw with {on}=True is our AdamW (optim/adamw.py), which does not support "
                         f"{', '.join(unsupported)}; these torch.optim.AdamW options need cautious=false and "
                         "cautious_wd=false")
    opt = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, cautious=cautious,
                cautious_wd=cautious_wd)
    opt.per_tensor = None if foreach is None else not foreach
    return opt
