"""Device choice: `trainer.device=auto` picks cuda > mps > cpu; what this machine cannot run. CPU threads."""

from __future__ import annotations

import importlib.util
import os
import shutil

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


def machine_problems(name: str, compile: bool, strategy: str) -> dict[str, str]:
    """config key -> why this machine cannot run the setting: the device, torch.compile (only setups known to
    fail at the first forward), DDP's backend."""
    try:
        device = resolve_device(name).type
    except ConfigError as e:
        return {"trainer.device": str(e)}
    where, found = f"trainer.device={name}" + (f" (resolves to {device} here)" if name == "auto" else ""), {}
    if compile:
        from torch._dynamo import is_dynamo_supported  # heavy (seconds): imported only when compile is asked for

        compiler = os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "clang++", "c++"))
        why = ("torch.compile (Dynamo) is not supported by this Python/torch build" if not is_dynamo_supported()
               else "TorchInductor on CPU needs a C++ compiler (g++ or clang++, or set CXX)" if device == "cpu"
               and not compiler else "TorchInductor on CUDA needs Triton (pip install triton)" if device == "cuda"
               and importlib.util.find_spec("triton") is None else None)
    if compile and why:
        found["trainer.compile"] = f"trainer.compile=true with {where}: {why}; use trainer.compile=false"
    if strategy == "ddp" and device == "mps":
        found["trainer.strategy"] = (f"trainer.strategy=ddp with {where}: torch.distributed has no MPS backend; use "
                                     "trainer.strategy=single")
    return found


def set_threads(n: int | None) -> int:
    """torch's intra-op thread count set to n (None: left as it is); returns the count before. Only a change is
    applied: setting the count, even to the one torch already uses, made the char-GPT's steps ~5% slower on a
    2-core AMD EPYC (OMP_NUM_THREADS does the same; bench/peer.py --threads 0 leaves both unset)."""
    previous = torch.get_num_threads()
    if n and n != previous:
        torch.set_num_threads(n)
    return previous

