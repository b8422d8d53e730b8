"""Gradient transforms, applied in order after unscaling and before the optimizer step.

Each transform is a small object: `__call__(params)` edits `p.grad` in place, and `state_dict` /
`load_state_dict` carry whatever it remembers (like optax's GradientTransformation). They never read
values back to the host, so they add no synchronisation to the step. The trainer's Chain starts with the
loss terms (coupled L2, like optax's add_decayed_weights), then the config's transforms in config order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from optim.param_groups import param_role


def _grads(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def global_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients together, as a 0-d tensor on the device (no sync)."""
    grads = _grads(params)
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class GradientTransform:
    """Base class: stateless unless a subclass says otherwise."""

    loss_term = False  # True: it adds a loss term's gradient (coupled L2); "the gradient" includes it

    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ClipNorm(GradientTransform):
    """Global norm clipping: g <- g * min(1, max_norm / ||g||), ||g|| over all parameters together.

    (Pascanu et al. 1211.5063.) Implemented by torch.nn.utils.clip_grad_norm_ (foreach, no host sync).
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"clip.norm.max_norm={max_norm} must be > 0")
        self.max_norm, self.norm_type = max_norm, norm_type

    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type, foreach=True)


class ClipValue(GradientTransform):
    """Element-wise clipping: g <- clamp(g, -value, value)."""

    def __init__(self, value: float = 1.0) -> None:
        if value <= 0:
            raise ValueError(f"clip.value.value={value} must be > 0")
        self.value = value

    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        torch.nn.utils.clip_grad_value_(params, self.value, foreach=True)


def _pairs(params: Iterable[torch.nn.Parameter]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, gradient) for every parameter that has a gradient, parameters detached."""
    return [(p.detach(), p.grad) for p in params if p.grad is not None]


def _unit_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit: over dims 1.. (keepdim) for a >=2-D tensor (rows of a Linear weight
    [out, in], output channels of a conv weight [out, in, kh, kw]); over the whole tensor for 0-D/1-D."""
    if t.ndim >= 2:
        return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)
    return torch.linalg.vector_norm(t)


class ClipAdaptive(GradientTransform):
    """Adaptive global-norm clipping at a percentile of the recent norm history (AutoClip, Seetharaman et al.
    2007.14469, with a sliding window instead of the whole history).

    Each call computes n_t = ||g|| over all parameters. A finite n_t is written into a ring buffer of the last
    `window` finite norms (the current one included, as in AutoClip). Once the buffer holds at least `warmup`
    norms, the threshold is c_t = the `percentile`-th percentile of the buffer (linear interpolation between
    order statistics: rank r = q*(k-1) over the k sorted entries, numpy's default) and
    g <- g * min(1, c_t / n_t). Before that, and on steps whose norm is inf/nan (an fp16 overflow that
    GradScaler skips), g is left unchanged and a non-finite norm never enters the history.

    The buffer, its write position and the percentile live on the gradients' device: no host sync. Empty slots
    hold NaN, so the count of recorded norms is read from the buffer itself.
    """

    def __init__(self, window: int = 100, percentile: float = 90.0, warmup: int = 10) -> None:
        if int(window) != window or window < 1:
            raise ValueError(f"clip.adaptive.window={window} must be an integer >= 1")
        if not 0 <= percentile <= 100:
            raise ValueError(f"clip.adaptive.percentile={percentile} must be in [0, 100]")
        if int(warmup) != warmup or not 1 <= warmup <= window:
            raise ValueError(f"clip.adaptive.warmup={warmup} must be an integer in [1, window={window}]")
        self.window, self.percentile, self.warmup = int(window), float(percentile), int(warmup)
        self.history = torch.full((self.window,), float("nan"))
        self.pos = torch.zeros((), dtype=torch.long)

    def threshold(self) -> torch.Tensor:
        """The current clipping threshold c (NaN while the history is empty), a 0-d tensor on the device."""
        ordered = torch.sort(self.history).values  # NaN (empty slots) sort last
        count = (~self.history.isnan()).sum()
        rank = (count - 1).clamp_min(0) * (self.percentile / 100)
        lo, hi = rank.floor().long().view(1), rank.ceil().long().view(1)
        return torch.lerp(ordered.gather(0, lo), ordered.gather(0, hi), rank - lo).squeeze(0)

    @torch.no_grad()
    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        grads = _grads(params)
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
        if self.history.device != norm.device:
            self.history, self.pos = self.history.to(norm.device), self.pos.to(norm.device)
        finite = norm.isfinite()
        slot = torch.arange(self.window, device=norm.device) == self.pos
        self.history.copy_(torch.where(slot & finite, norm, self.history))
        self.pos.add_(finite.long()).remainder_(self.window)
        threshold = self.threshold()
        warm = (~self.history.isnan()).sum() >= self.warmup
        clip = warm & finite & (norm > threshold)
        torch._foreach_mul_(grads, torch.where(clip, threshold / norm, torch.ones_like(norm)))

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.clone(), "pos": self.pos.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["history"].shape != (self.window,):
            raise ValueError(f"clip.adaptive: the saved history has {state['history'].numel()} slots but "
                             f"window={self.window}; resume with the window the run was started with")
        self.history = state["history"].detach().clone().float()
        self.pos = state["pos"].detach().clone().to(self.history.device)


class ClipAGC(GradientTransform):
    """Adaptive gradient clipping, unit-wise (Brock et al., NFNets, 2102.06171, Sec. 4.1).

    For each output unit i (a row of a Linear weight, an output channel of a conv weight: dims 1.. of a >=2-D
    tensor) with W_i* = max(||W_i||, eps): if ||G_i|| / W_i* > clipping then G_i <- G_i * clipping * W_i* /
    ||G_i||. Biases, norm gains and other 0-D/1-D tensors are one unit each (the whole vector), as in the
    paper's reference code. The paper leaves the final classifier layer unclipped: with skip_head (default)
    the parameters tagged "head" by optim.param_groups (the output layer's weight and bias) are left alone.
    Defaults: clipping 0.01, eps 1e-3.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, skip_head: bool = True) -> None:
        if clipping <= 0:
            raise ValueError(f"clip.agc.clipping={clipping} must be > 0")
        if eps <= 0:
            raise ValueError(f"clip.agc.eps={eps} must be > 0")
        self.clipping, self.eps, self.skip_head = clipping, eps, skip_head

    @torch.no_grad()
    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        skip = {id(p) for p in params if self.skip_head and param_role(p) == "head"}
        for p, g in _pairs(p for p in params if id(p) not in skip):
            max_norm = _unit_norm(p).clamp_min(self.eps) * self.clipping
            g_norm = _unit_norm(g)
            g.mul_(torch.where(g_norm > max_norm, max_norm / g_norm, 1.0).to(g.dtype))


class ClipSoft(GradientTransform):
    """Soft clipping per output unit: the gradient's RMS is clamped to the parameter's RMS.

    For each output unit i (dims 1.. of a >=2-D tensor; the whole tensor for 0-D/1-D), with
    r_p = max(rms(p_i), eps) and r_g = rms(g_i): if r_g > r_p then g_i <- g_i * r_p / r_g, so that afterwards
    rms(g_i) = min(rms(g_i), r_p). It is the RMS form of AGC (2102.06171) with clipping = 1. The eps floor
    (default 1e-3) lets zero-initialised tensors (LayerNorm biases) move at all: with eps -> 0 their
    gradients would be clipped to 0 for ever.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        if eps <= 0:
            raise ValueError(f"clip.soft.eps={eps} must be > 0")
        self.eps = eps

    @torch.no_grad()
    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        for p, g in _pairs(params):
            size = p[0].numel() if p.ndim >= 2 else max(p.numel(), 1)  # elements per unit
            p_rms = (_unit_norm(p) / size**0.5).clamp_min(self.eps)
            g_rms = _unit_norm(g) / size**0.5
            g.mul_(torch.where(g_rms > p_rms, p_rms / g_rms, 1.0).to(g.dtype))


class Normalize(GradientTransform):
    """Gradient normalization, per tensor (not global): g <- g / (||g|| + eps) for every parameter tensor
    separately, so each tensor's gradient has norm ~1 and only its direction is kept (the per-tensor
    normalization of normalized SGD, e.g. Cutkosky & Mehta 2002.03305). Default eps 1e-8."""

    def __init__(self, eps: float = 1e-8) -> None:
        if eps <= 0:
            raise ValueError(f"clip.normalize.eps={eps} must be > 0")
        self.eps = eps

    @torch.no_grad()
    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        grads = _grads(params)
        if grads:
            norms = torch._foreach_norm(grads)
            torch._foreach_add_(norms, self.eps)
            torch._foreach_div_(grads, norms)


class TrustRatio(GradientTransform):
    """Layer-wise norm adaptation, per tensor (the LAMB/LARS trust ratio as a transform; You et al.
    1904.00962, 1708.03888): g <- g * ||p|| / ||g|| when ||p|| > 0 and ||g|| > 0, else g unchanged.
    Afterwards every tensor's gradient has the norm of its parameter."""

    @torch.no_grad()
    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        pairs = _pairs(params)
        if not pairs:
            return
        ps, gs = [p for p, _ in pairs], [g for _, g in pairs]
        p_norm = torch.stack([n.float() for n in torch._foreach_norm(ps)])
        g_norm = torch.stack([n.float() for n in torch._foreach_norm(gs)])
        ratio = torch.where((p_norm > 0) & (g_norm > 0), p_norm / g_norm, 1.0)
        torch._foreach_mul_(gs, list(ratio.unbind()))


class Centralize(GradientTransform):
    """Gradient centralization (Yong et al. 2004.01461): for every >=2-D gradient,
    g <- g - mean(g over all dims but 0), i.e. each output unit's gradient gets zero mean. 0-D/1-D gradients
    (biases, norm gains) are unchanged, as in the paper."""

    @torch.no_grad()
    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        for g in _grads(params):
            if g.ndim >= 2:
                g.sub_(g.mean(dim=tuple(range(1, g.ndim)), keepdim=True))


class LayerScale(GradientTransform):
    """Per-layer gradient scaling by depth: g_l <- g_l * decay^(L-1-l).

    Layers are counted on the parameter list in model order (model.parameters()): layer l is the l-th
    parameter with >= 2 dims together with the 0-D/1-D parameters that follow it (its bias, the norm after
    it); 0-D/1-D parameters before the first matrix belong to layer 0. L is the number of >=2-D parameters.
    The last layer keeps its gradient, each earlier one is scaled by one more factor of `decay` (for
    decay < 1 the layers near the input learn slower, as in layer-wise learning-rate decay, ELECTRA
    2003.10555). With plain SGD/momentum this is exactly a per-layer learning rate; Adam-type optimizers
    divide the scale out again (only eps notices it), so use per-group learning rates there.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if decay <= 0:
            raise ValueError(f"clip.layer_scale.decay={decay} must be > 0")
        self.decay = decay

    def factors(self, params: Sequence[torch.nn.Parameter]) -> list[float]:
        """decay^(L-1-l) for every parameter, in order (computed on the host from shapes only)."""
        layer, layers = [], -1
        for p in params:
            layers += p.ndim >= 2
            layer.append(max(layers, 0))
        return [self.decay ** (max(layers, 0) - lay) for lay in layer]

    @torch.no_grad()
    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        params = list(params)
        pairs = [(g, f) for p, f in zip(params, self.factors(params)) if (g := p.grad) is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [f for _, f in pairs])


class Chain(GradientTransform):
    """Several transforms applied in order (the loss terms first); its state is the list of theirs."""

    def __init__(self, transforms: Sequence[GradientTransform]) -> None:
        self.transforms = list(transforms)
        self.terms = sum(t.loss_term for t in self.transforms)
        assert all(t.loss_term for t in self.transforms[:self.terms]), "loss terms lead the chain"

    def __call__(self, params: Sequence[torch.nn.Parameter], norms: bool = False) -> dict[str, torch.Tensor]:
        """With `norms`: the global norm of the gradient (loss terms included) before the other transforms, and
        after them when there are any (device tensors: no sync)."""
        for t in self.transforms[:self.terms]:
            t(params)
        out = {"grad_norm": global_norm(params)} if norms else {}
        for t in self.transforms[self.terms:]:
            t(params)
        if norms and len(self.transforms) > self.terms:
            out["grad_norm_after_transforms"] = global_norm(params)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"transforms": [t.state_dict() for t in self.transforms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for t, s in zip(self.transforms, state["transforms"], strict=True):
            t.load_state_dict(s)
