"""A tiny synthetic task with a known trajectory, for testing the loop without real data.

One scalar parameter w starts at 0; training minimises (w - target)^2, so plain SGD with lr gives
w_t = target * (1 - (1 - 2 lr)^t). The eval metric is |w - sweet_spot|: it improves until w passes the
sweet spot, then gets worse, which is exactly what early stopping should catch.
"""

from __future__ import annotations

import torch
from torch import nn

from core.task import Task


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, 1))  # 2-D, so it is in the decayed group


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient overflows at any loss scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("inf"))


class LineTask(Task):
    def __init__(self, target: float = 10.0, sweet_spot: float = 3.0, batch_size: int = 4, size: int = 64,
                 poison: list[int] | None = None, inf_grad: list[int] | None = None,
                 inf_grad_times: int | None = None) -> None:
        self.target, self.sweet_spot, self.batch_size, self.size = target, sweet_spot, batch_size, size
        self.poison = poison or []  # sample indices whose loss is NaN (fault injection)
        self.inf_grad = inf_grad or []  # sample indices whose loss is finite but whose gradient is infinite
        self.inf_grad_left = inf_grad_times  # how many batches get the infinite gradient (None: every one)

    def setup(self, device: torch.device) -> None:
        self.device = device

    def build_model(self) -> nn.Module:
        return Scalar()

    @property
    def train_size(self) -> int:
        return self.size

    def train_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return indices

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        losses = ((model.w - self.target) ** 2).reshape(1).expand(len(batch))
        if self.poison:
            bad = torch.isin(batch, torch.tensor(self.poison, device=batch.device))
            losses = torch.where(bad, torch.full_like(losses, float("nan")), losses)
        if self.inf_grad and self.inf_grad_left != 0:
            bad = torch.isin(batch, torch.tensor(self.inf_grad, device=batch.device))
            if bad.any():
                losses = torch.where(bad, InfiniteGradient.apply(losses), losses)
                if self.inf_grad_left is not None:
                    self.inf_grad_left -= 1
        return losses

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"distance": abs(model.w.item() - self.sweet_spot)}


class ShiftedLineTask(LineTask):
    """Another task with the same model (a checkpoint of one must not silently resume the other)."""
