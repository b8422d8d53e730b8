"""Which samples each optimizer step sees: a pure function of (seed, step).

EpochSampler shuffles epochs (each sample once per epoch); RandomSampler draws every batch independently with
replacement (random windows of a long text, as nanoGPT does). A task picks one with its `sampling` attribute.

Because the batch at step t is computed from t alone, the data position in a checkpoint is just the step,
and resuming reproduces the exact same batches. Indices are generated on the CPU with a private generator
(the global RNG stays untouched) and moved to the device once per epoch.
"""

from __future__ import annotations

import torch

from core.rng import step_seed


class EpochSampler:
    """Shuffled epochs without replacement; incomplete final batches are dropped so every step has one shape."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, device: torch.device) -> None:
        if batch_size > num_samples:
            raise ValueError(f"batch size {batch_size} is larger than the data set ({num_samples} samples)")
        self.num_samples, self.batch_size, self.seed, self.device = num_samples, batch_size, seed, device
        self.steps_per_epoch = num_samples // batch_size
        self._epoch, self._perm = -1, torch.empty(0)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch))
            self._perm = torch.randperm(self.num_samples, generator=g).to(self.device)
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """The global batch of optimizer step `step` (0-based)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]


class RandomSampler:
    """Independent uniform draws per step, from a generator re-seeded with (seed, step) on the device.

    `steps_per_epoch` is num_samples // batch_size: an "epoch" is as many samples as the data set holds.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, device: torch.device) -> None:
        self.num_samples, self.batch_size, self.seed, self.device = num_samples, batch_size, seed, device
        self.steps_per_epoch = max(1, num_samples // batch_size)
        self._gen = torch.Generator(device=device)

    def indices(self, step: int) -> torch.Tensor:
        self._gen.manual_seed(step_seed(self.seed, step))  # host-side: no device synchronisation
        return torch.randint(self.num_samples, (self.batch_size,), generator=self._gen, device=self.device)


SAMPLERS = {"epoch": EpochSampler, "random": RandomSampler}
