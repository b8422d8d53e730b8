"""What every optimizer of ours shares, whatever its rule.

* Hyperparameter checks that raise ValueError naming the bad value: "Invalid <name>: <value>", with what is
  wanted in parentheses where the check says it ("Invalid beta: 1.0 (want 0 <= beta < 1)"). The keyword
  forms check several values of one kind in the order given, e.g. `nonnegative(lr=lr, eps=eps)`.
* `closure_loss`: the loss of step(closure), evaluated with gradients enabled (step runs under no_grad).
* `groups_with_grads`: each param group with its parameters that have a gradient; groups where none has one
  are skipped.
* `state_bytes`: the memory an optimizer's state holds (the dry run and bench/optimizers.py report it).

Adam-specific checks and math stay in optim/adam_core.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor


# -- hyperparameter checks ------------------------------------------------------------------------------------
def require(ok: bool, name: str, value: Any, want: str | None = None) -> None:
    """Raise ValueError("Invalid <name>: <value>[ (<want>)]") unless ok."""
    if not ok:
        raise ValueError(f"Invalid {name}: {value}" + (f" ({want})" if want else ""))


def nonnegative(**values: float) -> None:
    """value >= 0 for each name=value ("Invalid lr: -1.0")."""
    for name, value in values.items():
        require(value >= 0.0, name, value)


def positive(**values: float) -> None:
    """value > 0 for each name=value ("Invalid kappa: 0.0 (want > 0)")."""
    for name, value in values.items():
        require(value > 0.0, name, value, "want > 0")


def unit_interval(**values: float) -> None:
    """0 <= value < 1 for each name=value, e.g. a momentum or EMA decay ("Invalid beta: 1.0 (want 0 <= beta < 1)")."""
    for name, value in values.items():
        require(0.0 <= value < 1.0, name, value, f"want 0 <= {name} < 1")


def beta_pair(name: str, betas: Sequence[float]) -> None:
    """Two values in [0, 1) ("Invalid betas: (0.9, 1.0) (want two values in [0, 1))")."""
    require(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), name, betas, "want two values in [0, 1)")


def one_of(name: str, value: Any, choices: Sequence[Any]) -> None:
    """value in choices ("Invalid mode: 'x' (use one of ('adversarial', 'compliant'))")."""
    require(value in choices, name, repr(value), f"use one of {choices}")


def int_at_least(name: str, value: Any, low: int) -> None:
    """An int >= low ("Invalid k: 0 (want an int >= 1)")."""
    require(isinstance(value, int) and value >= low, name, value, f"want an int >= {low}")


# -- step() ---------------------------------------------------------------------------------------------------
def closure_loss(closure: Callable[[], Any] | None, loss: Any = None) -> Any:
    """closure() with gradients enabled (step() runs under torch.no_grad), or `loss` without a closure."""
    if closure is None:
        return loss
    with torch.enable_grad():
        return closure()


def groups_with_grads(optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict[str, Any], list[Tensor]]]:
    """(group, the group's params that have a gradient) for every group where at least one has one."""
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if params:
            yield group, params


def state_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable through dicts, lists and tuples of a state_dict, each storage counted once;
    `param_groups` (hyperparameters, not state; a wrapper nests whole state_dicts, e.g. Muon's halves) left out."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(state_bytes(v, seen) for k, v in obj.items() if k != "param_groups")
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v, seen) for v in obj)
    return 0
