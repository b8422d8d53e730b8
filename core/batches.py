"""Where each optimizer step's batch comes from: the task's own tensors on the device, or a DataLoader.

The loop asks `batches(step)` for the grad_accum micro-batches of this rank's share of step `step`'s global batch
(core/sampler.py picks the sample indices, a pure function of seed and step). Two sources answer:

- DeviceBatches, the fast path for data sets that fit on the device: `task.train_batch(indices)` indexes tensors
  already there. No worker, no copy, no host synchronisation.
- LoaderBatches, for a map-style `torch.utils.data.Dataset` (`task.train_dataset()`): a torch DataLoader whose
  batch sampler (StepBatchSampler) yields exactly the indices the sampler gives for each step, starting at the
  step the run resumes from. Resume is therefore exact without saving any loader state. Per-sample randomness
  (augmentation in `__getitem__`) is seeded from (seed, step, position in the global batch) before each sample,
  so a step sees the same transformed batch whatever the number of workers, their timing, the number of DDP ranks
  or grad_accum. On CUDA, batches come through pinned memory and are copied with non_blocking=True.

DataLoading holds the data.* options (workers, pin_memory, prefetch, persistent_workers) and also gives tasks an
ordered loader for evaluation (`task.loading.ordered(dataset, batch_size)`).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from core.errors import ConfigError, UserError
from core.log import print_warning
from core.rng import EVAL_STREAM, sample_seeds, seed_host
from core.task import Task


class Failed:
    """A user-fixable error raised while loading a sample, carried back from a worker as data (a worker's exception
    would otherwise arrive wrapped in a traceback): the main process raises it as the UserError it was."""

    def __init__(self, error: UserError) -> None:
        self.kind, self.message = type(error), str(error)

    def raise_(self) -> None:
        raise self.kind(self.message)


class SeededSamples(Dataset):
    """Wraps a map-style data set: a key is (index, seed), and the RNGs are seeded with `seed` before `dataset[index]`.

    In the main process (data.workers=0) the RNG states are restored after each batch, so loading never moves the
    training RNG (dropout, ...)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        saved = None
        if get_worker_info() is None:
            saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            samples = []
            for index, seed in keys:
                seed_host(seed)
                samples.append(self.dataset[index])
            return samples
        except UserError as e:
            return [Failed(e)]
        finally:
            if saved is not None:
                torch.set_rng_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])


class _Collate:
    """The task's collate function (default_collate), letting a Failed sample (or a UserError of the collate
    itself) through to the main process."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None) -> None:
        self.collate = collate or default_collate

    def __call__(self, samples: list[Any]) -> Any:
        failed = next((s for s in samples if isinstance(s, Failed)), None)
        if failed is not None:
            return failed
        try:
            return self.collate(samples)
        except UserError as e:  # a task's collate naming what to fix: carried back like a sample's error
            return Failed(e)


def _quiet_worker(worker_id: int) -> None:
    """Workers ignore SIGINT/SIGTERM: Ctrl-C on a terminal (sent to the whole process group) or a cluster's SIGTERM
    reaches the main process, which finishes its step, writes the checkpoint and shuts the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def _no_worker_count_warning() -> Iterator[None]:
    """torch warns about "excessive worker creation" when a loader is made and started; DataLoading.from_config's
    warning names the key instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        yield


def start(loader: DataLoader) -> Iterator[Any]:
    with _no_worker_count_warning():
        return iter(loader)


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors anywhere in tuples, lists and dicts moved to `device` (asynchronously from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(b, device, non_blocking) for b in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def split_problem(batch_size: int, grad_accum: int, world: int = 1) -> str | None:
    """Why the global batch cannot be split into `world` ranks x `grad_accum` equal micro-batches (None: it can)."""
    if batch_size % (grad_accum * world) == 0:
        return None
    what = f"{world} DDP ranks x grad_accum must divide" if world > 1 else "must divide"
    return (f"trainer.grad_accum={grad_accum}: {what} task.batch_size={batch_size} (each optimizer batch is split "
            "into equal micro-batches)")


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass
class DataLoading:
    """How map-style data sets are loaded: the data.* options, for the device of the run."""

    device: torch.device
    workers: int = 0
    pin_memory: bool | str = "auto"
    prefetch: int = 2
    persistent_workers: bool = True

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.pin_memory == "auto":
            self.pin_memory = self.device.type == "cuda"
        self.pin_memory = bool(self.pin_memory) and self.device.type == "cuda"
        self._loaders: list[DataLoader] = []

    @classmethod
    def from_config(cls, data: Any, device: torch.device, warn: bool = True) -> DataLoading:
        get = data.get if data is not None else (lambda key, default: default)
        loading = cls(device, int(get("workers", 0)), get("pin_memory", "auto"), int(get("prefetch", 2)),
                      bool(get("persistent_workers", True)))
        cores = usable_cores()
        if warn and loading.workers > cores:

            print_warning(f"data.workers={loading.workers} is more than the {cores} CPU cores this process may use: "
                          f"the workers will compete for them (and with training). Try data.workers={cores} or less.")
        return loading

    def loader(self, dataset: Dataset, batch_sampler: Any, collate: Callable | None = None) -> DataLoader:
        """A DataLoader over `dataset` whose batch sampler yields lists of (index, seed) keys."""
        workers = self.workers
        with _no_worker_count_warning():
            loader = DataLoader(
                SeededSamples(dataset), batch_sampler=batch_sampler, num_workers=workers,
                collate_fn=_Collate(collate), pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch if workers else None,
                persistent_workers=self.persistent_workers and workers > 0,
                worker_init_fn=_quiet_worker if workers else None,
                generator=torch.Generator(),  # the loader's base seed is drawn from here, not from the global RNG
            )
        self._loaders.append(loader)
        return loader

    def receive(self, batch: Any) -> Any:
        """A batch from a loader, on the device (or the error a worker hit while loading it)."""
        if isinstance(batch, Failed):
            batch.raise_()
        return to_device(batch, self.device, non_blocking=self.pin_memory)

    def ordered(self, dataset: Dataset, batch_size: int, collate: Callable | None = None,
                seed: int = 0) -> OrderedBatches:
        """`dataset` in order, in batches on the device (the last one may be smaller), loaded like the training data;
        iterate it once per evaluation (persistent workers are kept between evaluations)."""
        return OrderedBatches(self, dataset, batch_size, collate, seed)

    def close(self) -> None:
        """Shut down every worker these loaders started (persistent workers otherwise live until garbage collection)."""
        for loader in self._loaders:
            iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps a persistent iterator
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            loader._iterator = None
        self._loaders.clear()


class OrderedBatchSampler:
    """Batches of consecutive indices 0..n-1, each key with its seed (so random eval transforms are repeatable)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b, start in enumerate(range(0, self.n, self.batch_size)):
            stop = min(start + self.batch_size, self.n)
            yield list(zip(range(start, stop), sample_seeds(self.seed, b, stop - start, EVAL_STREAM)))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class OrderedBatches:
    def __init__(self, loading: DataLoading, dataset: Dataset, batch_size: int, collate: Callable | None,
                 seed: int) -> None:
        self.loading, self.num_samples = loading, len(dataset)
        self.loader = loading.loader(dataset, OrderedBatchSampler(len(dataset), batch_size, seed), collate)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in start(self.loader):
            yield self.loading.receive(batch)


class StepBatchSampler:
    """For steps start, start+1, ..., stop-1: this rank's grad_accum micro-batches of the step's global batch, as
    lists of (index, seed) keys. The seed belongs to the position in the global batch, so sharding over ranks and
    splitting into micro-batches never change what a sample sees."""

    def __init__(self, sampler: Any, dist: Any, grad_accum: int, seed: int, stop: int) -> None:
        self.sampler, self.dist, self.grad_accum, self.seed = sampler, dist, grad_accum, seed
        self.start, self.stop = 0, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            indices = self.sampler.indices(step).tolist()
            keys = self.dist.shard(list(zip(indices, sample_seeds(self.seed, step, len(indices)))))
            micro = len(keys) // self.grad_accum
            for m in range(self.grad_accum):
                yield keys[m * micro : (m + 1) * micro]

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.grad_accum


class DeviceBatches:
    """The on-device path: the task indexes its own tensors (`task.train_batch(indices)`)."""

    def __init__(self, task: Any, sampler: Any, dist: Any, grad_accum: int, loading: DataLoading) -> None:
        self.task, self.sampler, self.dist, self.grad_accum, self.loading = task, sampler, dist, grad_accum, loading

    def __call__(self, step: int) -> Iterator[Any]:
        indices = self.dist.shard(self.sampler.indices(step))
        micro = len(indices) // self.grad_accum
        for m in range(self.grad_accum):
            yield self.task.train_batch(indices[m * micro : (m + 1) * micro])

    def close(self) -> None:
        self.loading.close()


class LoaderBatches:
    """The DataLoader path. The loader runs ahead through consecutive steps; asking for any other step (the first
    call after a resume, or a step redone after an fp16 overflow) restarts it at that step."""

    def __init__(self, dataset: Dataset, sampler: Any, dist: Any, grad_accum: int, loading: DataLoading, seed: int,
                 total_steps: int, collate: Callable | None = None) -> None:
        self.grad_accum, self.loading = grad_accum, loading
        self.batch_sampler = StepBatchSampler(sampler, dist, grad_accum, seed, total_steps)
        self.loader = loading.loader(dataset, self.batch_sampler, collate)
        self._iterator: Iterator[Any] | None = None
        self._next_step = -1

    def __call__(self, step: int) -> Iterator[Any]:
        if step != self._next_step or self._iterator is None:
            self.batch_sampler.start = step
            self._iterator = start(self.loader)
        self._next_step = -1  # until every micro-batch of this step has been taken
        for _ in range(self.grad_accum):
            yield self.loading.receive(next(self._iterator))
        self._next_step = step + 1

    def close(self) -> None:
        self._iterator = None
        self.loading.close()


def make_batches(task: Any, sampler: Any, dist: Any, grad_accum: int, seed: int,
                 total_steps: int) -> DeviceBatches | LoaderBatches:
    """The task's batch source: LoaderBatches when it provides a data set, else DeviceBatches."""
    dataset = task.train_dataset()
    if dataset is None:
        if type(task).train_batch is Task.train_batch:
            raise ConfigError(f"task._target_: {type(task).__module__}.{type(task).__name__} provides neither "
                              "train_dataset() (a map-style Dataset) nor train_batch(indices); see core/task.py")
        return DeviceBatches(task, sampler, dist, grad_accum, task.loading)
    return LoaderBatches(dataset, sampler, dist, grad_accum, task.loading, seed, total_steps,
                         task.collate)


def sampler_device(task: Any, device: torch.device) -> torch.device:
    """Where the sampler keeps its indices: on the device for train_batch, on the host for a DataLoader."""
    return device if task.train_dataset() is None else torch.device("cpu")
