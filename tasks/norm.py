"""Normalization layers chosen by config (conf/norm): batchnorm, layernorm, rmsnorm or none (norm=model: none
chosen, every model keeps its own).

`norm_layer(kind, num_features, spatial=...)` is what models call; conf/norm/<kind>.yaml binds `kind`
(and eps) with `_partial_`, so a model only says how many features it normalises and whether they are
image channels (spatial=True: BatchNorm2d over N,H,W; LayerNorm/RMSNorm over C,H,W as GroupNorm(1, C)
would be biased to one layout, so for images they normalise the channel vector at each position).
spatial="auto" finds the channel axis from the input (for models built by others, e.g. torchvision's
`norm_layer=` argument, used on [N, C, H, W] feature maps, [N, L, C] tokens and [N, H, W, C] windows alike).
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("none", "batchnorm", "layernorm", "rmsnorm")


class ChannelLast(nn.Module):
    """Apply a feature-wise norm to the channel dimension of an [N, C, H, W] tensor."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over every axis but 1, for inputs of any rank ([N, C], [N, C, L], [N, C, H, W], ...)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"batch norm needs an [N, C, ...] input, got shape {tuple(x.shape)}")


class AnyLayout(nn.Module):
    """A norm over `num_features` channels that sit at axis 1 ([N, C, ...]: convolution feature maps) or last
    ([N, L, C] tokens, [N, H, W, C]): axis 1 for 4-D inputs whose axis 1 has that size, else the last axis."""

    def __init__(self, norm: nn.Module, num_features: int, channels_first_native: bool) -> None:
        super().__init__()
        self.norm, self.num_features, self.first_native = norm, num_features, channels_first_native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.num_features
        first = x.dim() == 2 or (x.shape[1] == c and (x.dim() == 4 or x.shape[-1] != c))
        if first == self.first_native:
            return self.norm(x)
        if first:  # a last-axis norm (LayerNorm, RMSNorm) on [N, C, ...]
            return self.norm(x.movedim(1, -1)).movedim(-1, 1)
        return self.norm(x.movedim(-1, 1)).movedim(1, -1)  # batch norm (axis 1) on [..., C]


def norm_layer(num_features: int, kind: str = "none", eps: float = 1e-5, spatial: bool | str = False) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if not eps > 0:
        raise ValueError(f"norm.eps={eps}: must be a number > 0")
    if spatial == "auto":
        if kind == "batchnorm":
            return AnyLayout(_BatchNorm(num_features, eps=eps), num_features, channels_first_native=True)
        return AnyLayout(norm_layer(num_features, kind, eps), num_features, channels_first_native=False)
    if kind == "batchnorm":
        return (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(num_features, eps=eps)
    if kind == "layernorm":
        layer = nn.LayerNorm(num_features, eps=eps)
    elif kind == "rmsnorm":
        layer = nn.RMSNorm(num_features, eps=eps)
    else:
        raise ValueError(f"norm kind {kind!r}: use one of {', '.join(KINDS)}")
    return ChannelLast(layer) if spatial else layer
