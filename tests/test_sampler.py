"""The batch of each step is a pure function of (seed, step): epochs are permutations, resume needs only the step."""

from __future__ import annotations

import pytest
import torch

from core.sampler import EpochSampler


def test_each_epoch_is_a_permutation_and_batches_tile_it():
    s = EpochSampler(num_samples=10, batch_size=3, seed=7, device=torch.device("cpu"))
    assert s.steps_per_epoch == 3  # the incomplete batch is dropped
    for epoch in range(3):
        seen = torch.cat([s.indices(epoch * 3 + i) for i in range(3)])
        assert torch.equal(seen, s.permutation(epoch)[:9])
        assert sorted(s.permutation(epoch).tolist()) == list(range(10))
    assert not torch.equal(s.permutation(0), s.permutation(1))


def test_same_seed_same_batches_in_any_order_of_access():
    a = EpochSampler(100, 8, seed=1, device=torch.device("cpu"))
    b = EpochSampler(100, 8, seed=1, device=torch.device("cpu"))
    late = [b.indices(t) for t in (30, 2, 13)]  # a resumed run starts in the middle
    assert all(torch.equal(a.indices(t), x) for t, x in zip((30, 2, 13), late))
    c = EpochSampler(100, 8, seed=2, device=torch.device("cpu"))
    assert not torch.equal(a.indices(0), c.indices(0))


def test_batch_larger_than_data_is_rejected():
    with pytest.raises(ValueError, match="larger than the data set"):
        EpochSampler(4, 8, seed=0, device=torch.device("cpu"))
