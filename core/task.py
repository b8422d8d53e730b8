"""The task protocol: what a task provides, and what the trainer owns.

A task provides the data, the model, a per-sample loss and evaluation metrics. The trainer owns everything else:
which samples each step sees (a pure function of seed and step, core/sampler.py), batching and loading,
device placement, precision, gradient accumulation, DDP, the optimizer, the schedule, gradient transforms, logging,
checkpoints and resume.

Training data comes one of two ways (provide exactly one):

- `train_dataset()` returns a map-style `torch.utils.data.Dataset` (`__getitem__` and `__len__`). The trainer loads
  it with a DataLoader (`data.workers`, `data.pin_memory`, `data.prefetch`, `data.persistent_workers`), collates
  samples with `default_collate` (or the task's `collate(samples)`), moves the batch to the device and hands it to
  `loss`. Random transforms inside `__getitem__` are seeded per sample from (seed, step, position in the batch),
  so resume is exact and results do not depend on the number of workers.
- `train_batch(indices)` builds the batch for a tensor of sample indices from data the task already holds on the
  device (the fast path of the small built-in tasks; `train_size` must then be given).

Optional: `data_fingerprint()` (what identifies the data, for resume; the training set's size by default),
`final_metrics(model)` (metrics computed once at the end, e.g. a test split), `pictures(model, writer,
step)` (TensorBoard images at each evaluation), `save_pictures(model, folder)` (files at the end), `sampling =
"random"` (independent batches with replacement instead of shuffled epochs). Figures made with
`core.figures.subplots` and written with `figures.save` / `figures.add_figure` keep their text inside the image.

The trainer checks the protocol where it first relies on it (core/protocol.py) and stops with the rule and the fix:
`batch_size` and the methods before `setup`, the shape of `loss` on the first step, the result of `evaluate` at each
evaluation (also once before training unless `check_evaluate_first = False`) and the metrics the config watches.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate
from torch.utils.tensorboard import SummaryWriter


class Task(abc.ABC):
    """Subclass it, give `__init__` the config keys (conf/task/<name>.yaml's `task:` node is passed as keyword
    arguments, `_target_` naming the class) and implement the abstract methods."""

    batch_size: int  # the global batch size (per optimizer step, over all DDP ranks and micro-batches)
    sampling: str = "epoch"  # "epoch": shuffled epochs; "random": independent uniform draws per step
    # Set by the trainer before setup(): how map-style data sets are loaded in this run (data.*). Use
    # `self.loading.ordered(dataset, batch_size)` to iterate an evaluation split in batches on the device.
    loading: Any = None  # a core.batches.DataLoading
    # What the config checker (config/) checks without loading data. A task states them as class
    # attributes; tests/test_validate.py checks them against what the task really returns.
    norms: ClassVar[tuple[str, ...] | None] = None  # the conf/norm kinds its model can use; None: every kind
    eval_metrics: ClassVar[Mapping[str, str]] = {}  # evaluate()'s keys -> min | max (which way is better); {}: unknown
    test_metrics: ClassVar[Mapping[str, str]] = {}  # the keys final_metrics() adds, scored once at the end
    # Evaluate the initial model once before training, so a broken evaluate() or a watched metric it does not
    # report stops the run before a step is spent. kiln's own tasks turn it off: their results are tested against
    # their declared metrics, and the extra evaluation would cost short runs (up to seconds for the CNN).
    check_evaluate_first: ClassVar[bool] = True

    @classmethod
    def declared_metrics(cls, task: Mapping[str, Any]) -> tuple[Mapping[str, str], Mapping[str, str]]:
        """(eval metrics, test metrics) for this task config (its `task.*` keys): the class attributes, unless what
        the task reports depends on its settings (the VAE reports test_loss at evaluations without a val split)."""
        return cls.eval_metrics, cls.test_metrics

    # --- what the config checker (config/) asks of a task config (its resolved `task.*` keys), without data -----
    @classmethod
    def train_size_of(cls, task: Mapping[str, Any]) -> int | None:
        """The training-set size this task config (as for check) trains on, when known without data; else None."""
        return None

    @classmethod
    def check(cls, task: Mapping[str, Any]) -> list[str]:
        """This task config's own rule violations, one line each: `task.key=value: what is allowed`. `task`: the
        resolved `task.*` keys over the constructor's defaults."""
        batch = task.get("batch_size")
        ok = isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1
        return [] if ok or "batch_size" not in task else [f"task.batch_size={batch!r}: must be an int >= 1"]

    @abc.abstractmethod
    def setup(self, device: torch.device) -> None:
        """Load or index the data (called once, before build_model). Raise core.errors.DataNotFoundError with the
        config key and the fix when data are missing."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model. The trainer seeds the RNGs first (so the initialisation is repeatable) and moves it to the
        device."""

    def train_dataset(self) -> Dataset | None:
        """The training split as a map-style Dataset, for the trainer's DataLoader path (None: use train_batch)."""
        return None

    def train_batch(self, indices: torch.Tensor) -> Any:
        """The training batch for these sample indices (a device tensor), on the device: the on-device path."""
        raise NotImplementedError(f"{type(self).__name__} provides neither train_dataset() nor train_batch(indices)")

    def data_fingerprint(self) -> dict[str, Any]:
        """What identifies the data this task trains and evaluates on, cheaply (counts, file names and sizes, never
        contents), as {name: int or str}. Every checkpoint records it, and a resume whose data differ is refused
        (trainer.resume_allow_data_changes=true accepts it). Called once per run, after setup. Default: the training
        set's size; override it where data can change without the config changing (files in a folder)."""
        return {"train_size": self.train_size}

    @property
    def train_size(self) -> int:
        """Number of training samples; the sampler draws indices in [0, train_size)."""
        dataset = self.train_dataset()
        if dataset is None:
            raise NotImplementedError(f"{type(self).__name__}.train_batch needs a train_size property")
        return len(dataset)

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-sample training losses, shape [batch]: one value per sample of `batch`, not their mean. The trainer
        reduces them over the whole optimizer batch (regularize.loss_reduction). Called under autocast; `model` may
        be wrapped (DDP, torch.compile)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Evaluation metrics: {name: number} (Python floats or 0-d tensors), one per metric; `monitor.metric`,
        early stopping and plateau schedules name one of them. Called with the model in eval mode, gradients off and
        a fixed RNG seed."""

    # -- optional hooks: the trainer calls them; the defaults do nothing (override what the task has) -------------
    tokens_per_sample: int | None = None  # tokens in one sample: logs train/tokens_per_s

    @staticmethod
    def collate(samples: list[Any]) -> Any:
        """DataLoader samples -> one batch (optional; a static default, so workers need not pickle the task)."""
        return default_collate(samples)

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """Metrics computed once at the end with the final weights, e.g. a test split (optional; {}: none)."""
        return {}

    def pictures(self, model: nn.Module, writer: SummaryWriter, step: int) -> None:  # noqa: B027 (optional)
        """Write images or figures to TensorBoard at evaluation time (optional)."""

    def save_pictures(self, model: nn.Module, folder: Path) -> None:  # noqa: B027 (optional)
        """Write picture files into `folder` at the end of the run (optional)."""
