"""The DataLoader path (core/batches.py): a step's batch is a pure function of (seed, step), augmentation included,
whatever the number of workers, ranks or micro-batches; loading never moves the training RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from core.batches import StepBatchSampler
from core.sampler import EpochSampler
from tests.conftest import compose_cfg
from trainer.build import build
from trainer.distributed import Dist


def digits_cfg(folder, *overrides):
    """task=image_classification on the tiny ImageFolder, a tiny model (unless the overrides pick another)."""
    tiny = [] if any(o.startswith("task.model._target_=") for o in overrides) else ["+task.model.width=8"]
    return compose_cfg("task=image_classification", "task.dataset._target_=torchvision.datasets.ImageFolder",
                       f"task.dataset.root={folder / 'train'}", *tiny, "task.batch_size=16",
                       "task.eval_batch_size=64", "trainer.max_steps=40", "trainer.progress=off",
                       "trainer.pictures=false", "trainer.histogram_interval=0", *overrides)


def take(parts, steps):
    """Every micro-batch of these steps, in order."""
    return [batch for step in steps for batch in parts.batches(step)]


def reference_batch(task, seed: int, step: int) -> torch.Tensor:
    """The documented contract, without a DataLoader: the EpochSampler's indices for the step, and before each
    sample the global RNGs seeded with word `position` of SeedSequence([seed, step], spawn_key=(0,))."""
    indices = EpochSampler(task.train_size, task.batch_size, seed, torch.device("cpu")).indices(step).tolist()
    words = np.random.SeedSequence([seed, step], spawn_key=(0,)).generate_state(len(indices), np.uint64).tolist()
    images = []
    with torch.random.fork_rng(devices=[]):
        for index, word in zip(indices, words):
            torch.manual_seed(word)
            random.seed(word)
            np.random.seed(word & 0xFFFFFFFF)  # noqa: NPY002 (the global RNG is what user transforms draw from)
            images.append(task.train_set[index][0])
    return torch.stack(images)


def test_the_same_step_gives_the_same_augmented_batch_with_0_1_and_2_workers(digit_folder):
    steps = [0, 1, 7, 3, 30]  # out of order: the loader restarts where it is asked (resume, fp16 retry)
    batches = {}
    for workers in (0, 1, 2):
        parts = build(digits_cfg(digit_folder, f"data.workers={workers}", "trainer.grad_accum=2", "trainer.seed=3"))
        rng_before = torch.get_rng_state()
        try:
            batches[workers] = take(parts, steps)
        finally:
            parts.batches.close()
        assert torch.equal(torch.get_rng_state(), rng_before)  # loading never moves the training RNG
    assert len(batches[0]) == 2 * len(steps) and batches[0][0][0].shape == (8, 3, 28, 28)
    for workers in (1, 2):
        for (x0, y0), (x, y) in zip(batches[0], batches[workers]):
            assert torch.equal(x0, x) and torch.equal(y0, y)

    task = parts.task
    for i, step in enumerate(steps):
        x = torch.cat([batches[2][2 * i][0], batches[2][2 * i + 1][0]])  # the step's two micro-batches
        assert torch.equal(x, reference_batch(task, 3, step)), step
    # the augmentation is real: random crops differ from the plain (evaluation) transform of the same images
    indices = EpochSampler(task.train_size, 16, 3, torch.device("cpu")).indices(0).tolist()
    plain = torch.stack([task.eval_transform(task.train_set.base[task.train_set.indices[j]][0]) for j in indices])
    augmented = torch.cat([batches[0][0][0], batches[0][1][0]])
    assert sum(not torch.equal(a, b) for a, b in zip(augmented, plain)) >= 12


def test_a_sample_seen_in_two_epochs_is_augmented_differently(digit_folder):
    parts = build(digits_cfg(digit_folder, "task.batch_size=270"))  # one step per epoch: every sample, every step
    try:
        (x0, y0), (x1, y1) = take(parts, [0, 1])
    finally:
        parts.batches.close()
    order0 = EpochSampler(270, 270, 0, torch.device("cpu")).indices(0).tolist()
    order1 = EpochSampler(270, 270, 0, torch.device("cpu")).indices(1).tolist()
    same_image = [(order0.index(j), order1.index(j)) for j in range(270)]
    differ = sum(not torch.equal(x0[a], x1[b]) for a, b in same_image)
    assert differ >= 250 and all(y0[a] == y1[b] for a, b in same_image)


@pytest.mark.parametrize(("world", "grad_accum"), [(1, 4), (2, 1), (2, 2)])
def test_ranks_and_micro_batches_split_the_keys_one_process_would_use(world, grad_accum):
    sampler = EpochSampler(100, 8, seed=5, device=torch.device("cpu"))
    single = list(StepBatchSampler(sampler, Dist(), 1, seed=5, stop=30))
    per_rank = [list(StepBatchSampler(sampler, Dist(rank, world), grad_accum, seed=5, stop=30))
                for rank in range(world)]
    for step in range(30):
        joined = [key for rank in range(world) for key in
                  sum(per_rank[rank][step * grad_accum : (step + 1) * grad_accum], [])]
        assert joined == single[step]
    assert len({seed for batch in single for _, seed in batch}) == 30 * 8  # a distinct seed per (step, position)
    later = StepBatchSampler(sampler, Dist(), 1, seed=5, stop=30)
    later.start = 17  # a resumed run starts at its step
    assert list(later) == single[17:]


def test_workers_above_the_cores_warn_naming_the_key(digit_folder, capsys):
    parts = build(digits_cfg(digit_folder, "data.workers=512"))
    parts.batches.close()
    err = capsys.readouterr().err
    assert "data.workers=512" in err and "CPU cores" in err
