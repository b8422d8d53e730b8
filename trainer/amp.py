"""Mixed precision: autocast for bf16/fp16 and the GradScaler that fp16 needs (torch.amp API)."""

from __future__ import annotations

import contextlib

import torch

from core.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Precision:
    """`dtype` float32 runs plain; bfloat16 autocasts; float16 autocasts and scales the loss."""

    def __init__(self, dtype: str = "float32") -> None:
        if dtype not in _DTYPES:
            raise ConfigError(f"amp.dtype={dtype!r}: must be one of {', '.join(_DTYPES)}")
        self.dtype = _DTYPES[dtype]
        self.name = dtype

    def bind(self, device: torch.device) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
        """The autocast context to enter per forward, and the scaler (fp16 only)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext(), None
        if self.dtype == torch.float16 and device.type == "cpu":
            raise ConfigError("amp=fp16 needs a GPU (fp16 autocast + GradScaler); on CPU use amp=bf16 or amp=off")
        autocast = torch.autocast(device_type=device.type, dtype=self.dtype)
        scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        return autocast, scaler
