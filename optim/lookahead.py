"""Lookahead (Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
arXiv 1907.08610).

A wrapper around any optimizer (the "inner", fast one). The slow weights start as a copy of the parameters
(taken when the wrapper is built); every step runs the inner optimizer on the (fast) parameters, and every
k-th step of a group

    slow <- slow + alpha*(fast - slow);   fast <- slow

`k` and `alpha` are per param group (defaults 5 and 0.5, the paper's). The wrapper shares the inner
optimizer's param groups, so a schedule or GradScaler acting on it reaches the inner one; keyword arguments
of step() are forwarded (`requires_loss` mirrors the inner optimizer, so AdaLo can be wrapped). state_dict
holds the inner optimizer's state plus the slow weights.

Config: `optimizer=lookahead` wraps adamw; choose the inner optimizer with Hydra's package override
`optimizer@optimizer.inner=<option>` (e.g. `optimizer@optimizer.inner=nsgda`) and set its keys with
`optimizer.inner.lr=...`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from optim.core import int_at_least, require
from optim.schedule_free import has_modes

InnerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]


class Lookahead(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], inner: InnerFactory | torch.optim.Optimizer, k: int = 5,
                 alpha: float = 0.5) -> None:
        if isinstance(inner, str):
            raise ValueError(f"Invalid inner: {inner!r} is a name; choose the inner optimizer with "
                             f"optimizer@optimizer.inner={inner}")
        int_at_least("k", k, 1)
        require(0.0 < alpha <= 1.0, "alpha", alpha, "want 0 < alpha <= 1")
        self.inner = inner if isinstance(inner, torch.optim.Optimizer) else inner(params)
        if isinstance(self.inner, Lookahead):  # one set of param groups: the outer k, alpha would be ignored
            raise ValueError("optimizer.inner._target_='optim.lookahead.Lookahead': lookahead inside lookahead is not "
                             "supported: both wrap the same param groups, so the outer k and alpha are ignored and the "
                             "step counter moves twice per step; wrap a plain optimizer: "
                             "optimizer@optimizer.inner=adamw")
        if has_modes(self.inner):  # its groups' own `k` would be taken for lookahead's, and nothing switches its modes
            raise ValueError(f"optimizer.inner._target_: {type(self.inner).__name__} is schedule-free: its average of "
                             "the iterates already plays the slow weights' part, and lookahead cannot switch its "
                             "train/eval modes; use it alone (optimizer=sf_adamw), or wrap a plain optimizer")
        if clash := sorted({"k", "alpha", "lookahead_step"} & set(self.inner.defaults)):
            raise ValueError(f"optimizer.inner._target_: {type(self.inner).__name__} keeps its own {', '.join(clash)} "
                             "in its param groups, where lookahead keeps its settings; wrap another optimizer")
        # The base class adds k/alpha/lookahead_step to the inner optimizer's own group dicts.
        super().__init__(self.inner.param_groups, dict(k=k, alpha=alpha, lookahead_step=0))
        self.param_groups = self.inner.param_groups
        self.defaults = {**self.inner.defaults, **self.defaults}
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["slow"] = p.detach().clone()

    @property
    def requires_loss(self) -> bool:
        return getattr(self.inner, "requires_loss", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor | None:
        loss = self.inner.step(closure, **kwargs) if closure is not None else self.inner.step(**kwargs)
        for group in self.param_groups:
            params = group["params"]
            group["lookahead_step"] += 1
            if params and group["lookahead_step"] % group["k"] == 0:
                slow = [self.state[p]["slow"] for p in params]
                torch._foreach_lerp_(slow, params, group["alpha"])
                torch._foreach_copy_(params, slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        slow = {index[id(p)]: s["slow"] for p, s in self.state.items() if "slow" in s}
        return {"inner": self.inner.state_dict(), "slow": slow}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict["inner"])  # k, alpha and lookahead_step come with the groups
        self.param_groups = self.inner.param_groups
        params = [p for g in self.param_groups for p in g["params"]]
        self.state.clear()
        for i, slow in state_dict["slow"].items():
            p = params[int(i)]
            self.state[p]["slow"] = slow.to(dtype=p.dtype, device=p.device, copy=True)
