"""Every seed a run derives, and capturing every random number generator it touches, so resume is exact.

Seeds are pure functions of (seed, step, ...): the samplers' (step_seed), each sample's (sample_seeds: numpy's
SeedSequence, well-mixed 64-bit words; torch's own worker seeding, `base_seed + worker_id`, would depend on which
worker loads a sample) and each DDP rank's (rank_seed). `torch.manual_seed` seeds the CPU generator and every
accelerator's (CUDA, MPS); so each of them is saved in a checkpoint and forked around an evaluation, which reseeds
them.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch

TRAIN_STREAM, EVAL_STREAM = 0, 1  # independent seed streams for training batches and ordered (evaluation) loading


def step_seed(seed: int, n: int) -> int:
    """The seed of a sampler's generator at step (or epoch) n; below 2**64 for every seed core/config.py allows."""
    return seed * 1_000_003 + n


def sample_seeds(seed: int, step: int, n: int, stream: int = TRAIN_STREAM) -> list[int]:
    """One 64-bit seed per position of a batch of n samples: a pure function of (seed, step, position)."""
    return np.random.SeedSequence([seed, step], spawn_key=(stream,)).generate_state(n, np.uint64).tolist()


def seed_host(seed: int) -> None:
    """Seed every generator a sample transform may draw from: torch's CPU generator, Python's and numpy's."""
    torch.default_generator.manual_seed(seed)  # CPU only (torch.manual_seed would also touch every GPU: ~1 ms)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rank_seed(seed: int, rank: int) -> int | None:
    """The seed of DDP rank `rank`'s training stream (dropout, noise drawn in loss()), or None for rank 0: it keeps
    the stream a single process has after the model's initialisation, so one rank equals one process. The other
    ranks' seeds are mixed from (seed, rank): no two (seed, rank) pairs share a stream (seed + rank would give
    rank 1 of seed 0 the stream of rank 0 of seed 1)."""
    if rank == 0:
        return None
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """On exit, the CPU generator and the accelerator's are back where they were: the run's CUDA device, or the MPS
    generator (one per machine, seeded by torch.manual_seed whichever device the run uses)."""
    if torch.backends.mps.is_available():
        return torch.random.fork_rng(devices=["mps"], device_type="mps")
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda")
