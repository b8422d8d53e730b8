"""One optimizer made of two: a matrix method for the hidden weights, torch.optim.AdamW for everything else.

Methods defined for the weight matrices of hidden layers (Muon, SOAP, Shampoo) are run this way: each incoming
param group is split by `routes(p, group)` (usually from the role optim/param_groups.py gave p: hidden weights
and untagged matrices go to the matrix method; biases, norm weights, scalars, embeddings and the output head to
AdamW). Each half gets one inner group per incoming group, with the hyperparameters named by its key map
(inner key -> our key, or a function of our group, e.g. a learning rate as a ratio of ours), copied from the
incoming group at every step, so a schedule or GradScaler acting on this optimizer's param_groups reaches both
halves and a no_decay group stays undecayed on both. state_dict holds both halves under `side` (the matrix
method's name) and "adamw".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from optim.core import closure_loss
from optim.param_groups import param_role

# inner key -> our key, or a function of our group
KeyMap = Mapping[str, str | Callable[[Mapping[str, Any]], Any]]


def mapped(group: Mapping[str, Any], keys: KeyMap) -> dict[str, Any]:
    """The inner group's hyperparameters, read from our group through the key map."""
    return {k: src(group) if callable(src) else group[src] for k, src in keys.items()}


def is_hidden_matrix(p: torch.Tensor, group: Mapping[str, Any], force_key: str, min_dim: int = 2,
                     max_dim: int | None = 2) -> bool:
    """True for a hidden weight (or an untagged tensor) with min_dim <= p.ndim <= max_dim (no upper bound when
    max_dim is None), unless the group forces its tensors of those ranks with `force_key: True/False`."""
    if p.ndim < min_dim or (max_dim is not None and p.ndim > max_dim):
        return False
    forced = group.get(force_key)
    if forced is not None:
        return bool(forced)
    return param_role(p) in (None, "hidden")


class SplitOptimizer(torch.optim.Optimizer):
    """Subclasses set `side` (the matrix half's attribute and state_dict key) and call __init__ with the matrix
    method's constructor and key maps; adamw_keys maps torch.optim.AdamW's keys to ours."""

    side: str = "matrix"

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any],
                 routes: Callable[[torch.Tensor, dict[str, Any]], bool],
                 make_matrix: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
                 matrix_keys: KeyMap, adamw_keys: KeyMap) -> None:
        super().__init__(params, defaults)
        halves: dict[str, list[dict[str, Any]]] = {self.side: [], "adamw": []}
        # (index of our group, half, index of the inner group, key map)
        self._links: list[tuple[int, str, int, KeyMap]] = []
        for i, group in enumerate(self.param_groups):
            chosen = [p for p in group["params"] if routes(p, group)]
            rest = [p for p in group["params"] if not routes(p, group)]
            for side, ps, keys in ((self.side, chosen, matrix_keys), ("adamw", rest, adamw_keys)):
                if ps:
                    self._links.append((i, side, len(halves[side]), keys))
                    halves[side].append({"params": ps, **mapped(group, keys)})
        setattr(self, self.side, make_matrix(halves[self.side]) if halves[self.side] else None)
        self.adamw = torch.optim.AdamW(halves["adamw"]) if halves["adamw"] else None

    def halves(self) -> tuple[torch.optim.Optimizer | None, torch.optim.Optimizer | None]:
        return getattr(self, self.side), self.adamw

    def _sync(self) -> None:
        """Copy each group's (possibly scheduled) hyperparameters into the inner groups made from it."""
        for i, side, j, keys in self._links:
            getattr(self, side).param_groups[j].update(mapped(self.param_groups[i], keys))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = closure_loss(closure)
        self._sync()
        for inner in self.halves():
            if inner is not None:
                inner.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # our groups (hyperparameters, initial_lr); the state lives in the halves
        for side, inner in zip((self.side, "adamw"), self.halves()):
            sd[side] = inner.state_dict() if inner is not None else None
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        for group in self.param_groups:  # checkpoints from before a hyperparameter existed
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for side, inner in zip((self.side, "adamw"), self.halves()):
            if side not in state_dict:
                raise ValueError(f"state_dict has no {side} half: it was saved by another optimizer")
            if (inner is None) != (state_dict[side] is None):
                raise ValueError(f"state_dict has {'no ' if state_dict[side] is None else ''}{side} half, "
                                 f"this optimizer has {'none' if inner is None else 'one'}")
            if inner is not None:
                inner.load_state_dict(state_dict[side])
