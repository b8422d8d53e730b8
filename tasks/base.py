"""What the trainer needs from a task.

A task owns its data (kept on the device for small data sets), builds its model, and turns a batch into
per-sample losses. The trainer owns everything else: sampling, precision, accumulation, the optimizer.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tasks.norm import KINDS


class Task(abc.ABC):
    batch_size: int
    # What the config validator (trainer/validate.py) checks without loading data. A task states them as class
    # attributes; tests/test_validate.py checks them against what the task really returns.
    norms: ClassVar[tuple[str, ...]] = KINDS  # the conf/norm kinds its model can use
    eval_metrics: ClassVar[Mapping[str, str]] = {}  # evaluate()'s keys -> min | max (which way is better); {}: unknown
    test_metrics: ClassVar[Mapping[str, str]] = {}  # the keys final_metrics() adds, scored once at the end

    @classmethod
    def declared_metrics(cls, task: Mapping[str, Any]) -> tuple[Mapping[str, str], Mapping[str, str]]:
        """(eval metrics, test metrics) for this task config (its `task.*` keys): the class attributes, unless what
        the task reports depends on its settings (the VAE reports test_loss at evaluations without a val split)."""
        return cls.eval_metrics, cls.test_metrics

    @abc.abstractmethod
    def setup(self, device: torch.device) -> None:
        """Load the data onto `device`. Raise DataNotFoundError when it is missing."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model (the trainer seeds the RNG first and moves it to the device)."""

    @property
    @abc.abstractmethod
    def train_size(self) -> int:
        """Number of training samples; the sampler draws indices in [0, train_size)."""

    @abc.abstractmethod
    def train_batch(self, indices: torch.Tensor) -> Any:
        """The training batch for these sample indices, on the device."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-sample training losses, shape [batch]. The trainer reduces them."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Evaluation metrics, called with the model in eval mode and gradients off."""

    def pictures(self, model: nn.Module, writer: SummaryWriter, step: int) -> None:  # noqa: B027 (optional)
        """Write images or figures to TensorBoard at evaluation time (optional)."""
