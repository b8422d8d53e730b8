"""MNIST digit classification with a small CNN (the size of pytorch/examples mnist).

conv3x3(32) - norm - ReLU - conv3x3(64) - norm - ReLU - maxpool2 - dropout - fc(9216 -> 128) - norm - ReLU -
dropout - fc(128 -> 10). Normalization comes from conf/norm (BatchNorm2d over N,H,W for the convolutions), the
dropout rate from regularize.dropout, label smoothing from regularize.label_smoothing, augmentation from
regularize.augment (applied per sample on the device).

A validation split (the last `val_size` images of a seeded permutation of the training set) drives evaluation
and early stopping; the test set is scored once, at the end (`final_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.task import Task
from tasks.data import load_mnist, mnist_train_size, root_problems, val_size_problems
from tasks.norm import norm_layer

NormFactory = Callable[..., nn.Module]
MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics, as in pytorch/examples


class CNN(nn.Module):
    def __init__(self, norm: NormFactory | None = None, dropout: float = 0.25, channels: tuple[int, int] = (32, 64),
                 hidden: int = 128, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        norm = norm or (lambda n, spatial=False: norm_layer(n, "none", spatial=spatial))
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3), norm(c1, spatial=True), nn.ReLU(),
            nn.Conv2d(c1, c2, 3), norm(c2, spatial=True), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(dropout), nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(c2 * 12 * 12, hidden), norm(hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MnistCNN(Task):
    check_evaluate_first = False  # tested against eval_metrics instead (tests/test_validate.py)
    eval_metrics = {"val_loss": "min", "val_acc": "max"}
    test_metrics = {"test_loss": "min", "test_acc": "max"}

    @classmethod
    def train_size_of(cls, task: Mapping[str, Any]) -> int | None:
        return mnist_train_size(task["val_size"])

    @classmethod
    def check(cls, task: Mapping[str, Any]) -> list[str]:
        return super().check(task) + val_size_problems(task["val_size"], 1, "the CNN evaluates on that split") + \
            root_problems("task.data_root", task.get("data_root"))

    def __init__(self, data_root: str, download: bool | str = "auto", batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, norm: NormFactory | None = None,
                 dropout: float = 0.25, label_smoothing: float = 0.0, augment: Callable | None = None,
                 split_seed: int = 0) -> None:
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"regularize.label_smoothing={label_smoothing} must be in [0, 1)")
        self.data_root, self.download = data_root, download
        self.batch_size, self.eval_batch_size, self.val_size = batch_size, eval_batch_size, val_size
        self.norm, self.dropout, self.label_smoothing = norm, dropout, label_smoothing
        self.augment = augment() if augment is not None else None
        self.split_seed = split_seed

    def setup(self, device: torch.device) -> None:
        train_x, train_y, test_x, test_y = load_mnist(self.data_root, self.download)
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(self.split_seed))
        train_idx, val_idx = perm[: -self.val_size], perm[-self.val_size :]
        # uint8 images on the device (1x28x28 each); normalised per batch
        self.train_x, self.train_y = train_x[train_idx].unsqueeze(1).to(device), train_y[train_idx].to(device)
        self.val_x, self.val_y = train_x[val_idx].unsqueeze(1).to(device), train_y[val_idx].to(device)
        self.test_x, self.test_y = test_x.unsqueeze(1).to(device), test_y.to(device)
        self.device = device

    def build_model(self) -> nn.Module:
        return CNN(self.norm, self.dropout)

    @property
    def train_size(self) -> int:
        return len(self.train_x)

    @staticmethod
    def _pixels(x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255)

    def train_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._pixels(self.train_x[indices])
        if self.augment is not None:
            x = self.augment(x)  # on [0, 1] pixels, before normalisation (erased = black background)
        return x.sub_(MEAN).div_(STD), self.train_y[indices]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).float(), y, reduction="none", label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def _score(self, model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> tuple[float, float]:
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for i in range(0, len(xs), self.eval_batch_size):
            x = self._pixels(xs[i : i + self.eval_batch_size]).sub_(MEAN).div_(STD)
            y = ys[i : i + self.eval_batch_size]
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
        return loss.item() / len(xs), correct.item() / len(xs)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loss, acc = self._score(model, self.val_x, self.val_y)
        return {"val_loss": loss, "val_acc": acc}

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """The test set, scored once with the final (or restored best) weights."""
        loss, acc = self._score(model, self.test_x, self.test_y)
        return {"test_loss": loss, "test_acc": acc}
