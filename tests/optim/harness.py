"""Shared checks for optimizers: fixed tensors and gradients with a stepping helper for the hand-computed
references, convergence on classic functions, and state_dict lock-step.

Each optimizer's own test file supplies `make(params) -> Optimizer` and its hand-computed reference of the
published rule; the checks here are the same for every optimizer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

MakeOpt = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


# -- hand-set gradients: the fixed tensors of the reference tests and a run of an optimizer on them ----------
F64 = torch.float64
MATRIX = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=F64)
VECTOR = torch.tensor([0.3, -0.2, 1.1], dtype=F64)
MATRIX_GRADS = [torch.tensor([[0.1, -0.4, 0.9], [-1.2, 0.05, 0.3]], dtype=F64),
                torch.tensor([[0.3, 0.2, -0.5], [-0.7, 0.6, 0.1]], dtype=F64),
                torch.tensor([[-0.2, -0.8, 1.4], [0.4, -0.3, 0.2]], dtype=F64)]
VECTOR_GRADS = [torch.tensor([0.5, -0.1, 0.02], dtype=F64), torch.tensor([-0.3, 0.4, 0.2], dtype=F64),
                torch.tensor([0.6, 0.1, -0.9], dtype=F64)]


def stepped(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
            grads_per_step: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Set each step's gradients by hand and step; returns the parameters after each step."""
    out = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def trajectory(make, starts, grads_per_step, **group_kw) -> list[list[torch.Tensor]]:
    """Parameters after each step, with the gradients set by hand. Group 0 holds starts[0] (with group_kw),
    group 1 the rest (optimizer defaults)."""
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    return stepped(make([{"params": params[:1], **group_kw}, {"params": params[1:]}]), params, grads_per_step)


def check_against(actual: list[list[torch.Tensor]], expected: list[list[torch.Tensor]], rtol: float = 1e-12,
                  atol: float = 1e-14) -> None:
    for step, (got, want) in enumerate(zip(actual, expected, strict=True), 1):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            where = f"step {step}, tensor {i}"
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, where=where: f"{where}: {m}")


# -- the cautious options, written from their papers (optim/cautious.py implements them) ------------------------
CAUTION = [dict(cautious=False, cautious_wd=False), dict(cautious=True, cautious_wd=False),
           dict(cautious=False, cautious_wd=True), dict(cautious=True, cautious_wd=True)]


def _caution(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Cautious masking (2411.16085): keep u where u*g > 0, rescale by 1/max(fraction kept, 1e-3)."""
    keep = (u * g > 0).to(u.dtype)
    return u * keep / max(keep.mean().item(), 1e-3)


def _decay(p: torch.Tensor, u: torch.Tensor, wd: float, cautious_wd: bool) -> torch.Tensor:
    """The decoupled decay term wd*p, only where u*p >= 0 with cautious weight decay (2510.12402)."""
    return wd * p * ((u * p >= 0).to(p.dtype) if cautious_wd else 1.0)


# -- convergence and state_dict -------------------------------------------------------------------------------
def quadratic(p: torch.Tensor) -> torch.Tensor:
    """Ill-conditioned convex quadratic with minimum 0 at p = 1 (condition number 100)."""
    scales = torch.logspace(0, 2, p.numel(), dtype=p.dtype)
    return 0.5 * (scales * (p - 1) ** 2).sum()


def rosenbrock(p: torch.Tensor) -> torch.Tensor:
    """Rosenbrock's banana, minimum 0 at (1, 1)."""
    x, y = p[0], p[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def minimise(make: MakeOpt, fn: Callable[[torch.Tensor], torch.Tensor], start: list[float], steps: int,
             loss_kwarg: bool = False) -> torch.Tensor:
    """Run `steps` optimizer steps on fn from `start` (float64); returns the final point.

    The parameter is a 2-D [1, n] tensor so that optimizers with matrix-only rules (Adafactor's factored
    moments, Muon, SMMF) see a matrix. With loss_kwarg, step(loss=...) receives the current loss.
    """
    p = torch.nn.Parameter(torch.tensor([start], dtype=torch.float64))
    opt = make([p])
    for _ in range(steps):
        opt.zero_grad()
        loss = fn(p.view(-1))
        loss.backward()
        opt.step(loss=loss.detach()) if loss_kwarg else opt.step()
    return p.detach().view(-1)


def assert_converges(make: MakeOpt, fn: Callable[[torch.Tensor], torch.Tensor], start: list[float],
                     steps: int, tol: float, loss_kwarg: bool = False) -> None:
    end = minimise(make, fn, start, steps, loss_kwarg)
    start_loss, end_loss = fn(torch.tensor(start, dtype=torch.float64)).item(), fn(end).item()
    assert end_loss < tol, f"loss {start_loss:.4g} -> {end_loss:.4g} after {steps} steps (want < {tol})"


def _model_and_batches(seed: int = 0) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    batches = [(torch.randn(16, 6, generator=g, dtype=torch.float64),
                torch.randn(16, 3, generator=g, dtype=torch.float64)) for _ in range(12)]
    return model, batches


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, batches, loss_kwarg: bool) -> None:
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss.detach()) if loss_kwarg else opt.step()


def assert_state_dict_lockstep(make: MakeOpt, n: int = 5, loss_kwarg: bool = False) -> None:
    """Run n steps; clone model and optimizer through state_dict into fresh objects; run the remaining
    steps on both: every parameter must stay exactly equal. Uses two param groups (one without decay)."""
    model, batches = _model_and_batches()
    opt = make(_groups(model))
    _train(model, opt, batches[:n], loss_kwarg)

    twin, _ = _model_and_batches()
    twin.load_state_dict(model.state_dict())
    twin_opt = make(_groups(twin))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))

    _train(model, opt, batches[n:], loss_kwarg)
    _train(twin, twin_opt, batches[n:], loss_kwarg)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), f"{name} differs after state_dict round trip"
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), _model_and_batches()[0].parameters())]
    assert any(moved), "the optimizer did not change any parameter"


def _groups(model: torch.nn.Module) -> list[dict]:
    weights = [p for p in model.parameters() if p.ndim == 2]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]
