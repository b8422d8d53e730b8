"""A tiny task for testing experiments.compare in seconds: linear regression on fixed synthetic data.

y = x.w* + noise with x ~ N(0, scale^2 I) in `dim` dimensions, drawn once from `data_seed` (never from
trainer.seed), split into train / validation / test. The model is one Linear layer, so its initial weights and the
batch order are what trainer.seed decides. The per-sample loss is the squared error; with SGD it diverges
(overflows) for a learning rate much above 1 / (largest Hessian eigenvalue, which grows as scale^2), and Adam-like
steps never do. Metrics: val_loss (mean squared error on the validation split) at every evaluation, test_loss once
at the end.
"""

from __future__ import annotations

import torch
from torch import nn

from core.task import Task


class Regression(Task):
    def __init__(self, dim: int = 8, train_size: int = 256, val_size: int = 64, test_size: int = 64,
                 batch_size: int = 16, noise: float = 0.3, scale: float = 1.0, data_seed: int = 1234) -> None:
        self.dim, self.size, self.val_size, self.test_size = dim, train_size, val_size, test_size
        self.scale = scale
        self.batch_size, self.noise, self.data_seed = batch_size, noise, data_seed

    def setup(self, device: torch.device) -> None:
        g = torch.Generator().manual_seed(self.data_seed)
        n = self.size + self.val_size + self.test_size
        x = self.scale * torch.randn(n, self.dim, generator=g)
        w = torch.randn(self.dim, 1, generator=g)
        y = x @ w + self.noise * torch.randn(n, 1, generator=g)
        x, y = x.to(device), y.to(device)
        a, b = self.size, self.size + self.val_size
        self.x, self.y = x[:a], y[:a]
        self.val = x[a:b], y[a:b]
        self.test = x[b:], y[b:]

    def build_model(self) -> nn.Module:
        return nn.Linear(self.dim, 1)

    @property
    def train_size(self) -> int:
        return self.size

    def train_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((model(x) - y) ** 2).squeeze(1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x, y = self.val
        return {"val_loss": ((model(x) - y) ** 2).mean().item()}

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        x, y = self.test
        return {"test_loss": ((model(x) - y) ** 2).mean().item()}
