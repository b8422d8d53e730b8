"""Device choice: `trainer.device=auto` picks cuda > mps > cpu. CPU threads: `set_threads`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from core.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"trainer.device={name!r}: not a device ({e}); use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}: CUDA is not available here; use trainer.device=auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"trainer.device={name!r}: this machine has {n} CUDA device(s); use cuda:0..cuda:{n - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device={name!r}: MPS is not available here; use trainer.device=auto or cpu")
    return device


def set_threads(n: int | None) -> int:
    """torch's intra-op thread count set to n (None: left as it is); returns the count before. Only a change is
    applied: setting the count, even to the one torch already uses, made the char-GPT's steps ~5% slower on a
    2-core AMD EPYC (OMP_NUM_THREADS does the same; bench/peer.py --threads 0 leaves both unset)."""
    previous = torch.get_num_threads()
    if n and n != previous:
        torch.set_num_threads(n)
    return previous


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """set_threads(n) for the duration of the block, then the count before it."""
    previous = set_threads(n)
    try:
        yield
    finally:
        set_threads(previous)
