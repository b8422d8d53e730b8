"""SGD along a Grunwald-Letnikov fractional-order gradient: the gradient replaced by its fractional difference of
order `order` over the last `window` steps (the technique seed 002 names; Zhou, Zhao & Huang, "A Deep Learning
Optimizer Based on Grunwald-Letnikov Fractional Order Definition", Mathematics 11(2):316, 2023, build their
FCGD_G-L/FCSGD_G-L on it with a 10-step window).

The Grunwald-Letnikov derivative of order a of a sequence sampled at unit steps, truncated to K terms (the
"short-memory principle", Podlubny, Fractional Differential Equations, 1999, Sec. 7.3):

    D^a g_t = sum_{k=0}^{K-1} w_k g_{t-k},   w_k = (-1)^k binom(a, k):  w_0 = 1,  w_k = w_{k-1} (1 - (a + 1)/k)

(the recursion, from Gamma(k - a)/(Gamma(-a) Gamma(k + 1)), needs no Gamma function). The update is

    g_t <- g_t + wd*p  (L2, as torch.optim.SGD);   p <- p - lr * D^a g_t

with D^a over the gradients of the last `window` steps (fewer at the start). The order sets what the memory does:
a = 0 is plain SGD (w = 1, 0, 0, ...); 0 < a < 1 is a fractional difference (w_k < 0 for k >= 1: past gradients
are subtracted, the step anticipates a change of the gradient, and the weights sum to a fraction of 1); -1 < a < 0
is a fractional integral (all w_k > 0, decaying like k^(-a-1)): past gradients are added with a power-law, long
memory, like heavy-ball momentum with a slower-than-exponential kernel, and for a constant gradient the step is
sum(w) = binom(K - 1 - a, K - 1) times SGD's (3.52 at a = -0.5, K = 10). The default a = -0.5 is that long-memory form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from optim.core import closure_loss, groups_with_grads, int_at_least, nonnegative, require


def gl_weights(order: float, window: int) -> list[float]:
    """The Grunwald-Letnikov coefficients w_0 .. w_{window-1} of `order`: w_0 = 1, w_k = w_{k-1}(1 - (order+1)/k)."""
    weights = [1.0]
    for k in range(1, window):
        weights.append(weights[-1] * (1.0 - (order + 1.0) / k))
    return weights


class GLFractional(torch.optim.Optimizer):
    """SGD on the Grunwald-Letnikov fractional difference of the gradient sequence (see the module docstring)."""

    def __init__(self, params: Iterable[Any], lr: float = 0.01, order: float = -0.5, window: int = 10,
                 weight_decay: float = 0.0) -> None:
        nonnegative(lr=lr, weight_decay=weight_decay)
        require(-1.0 < order < 1.0, "order", order, "want -1 < order < 1")
        int_at_least("window", window, 1)
        super().__init__(params, dict(lr=lr, order=order, window=window, weight_decay=weight_decay))
        self._cache: dict[tuple, torch.Tensor] = {}

    def _coefficients(self, group: dict[str, Any], t: int, like: torch.Tensor) -> torch.Tensor:
        """w_1 .. w_{window-1} placed at the ring slots of g_{t-1} .. g_{t-window+1} (slot of g_{t-k}: (t-k) % memory).
        One tensor per ring position, built once per (order, window, dtype, device) and reused."""
        memory = group["window"] - 1
        key = (group["order"], group["window"], t % memory, like.dtype, like.device)
        cached = self._cache.get(key)
        if cached is None:
            coeffs = [0.0] * memory
            for k, w in enumerate(gl_weights(group["order"], group["window"])[1:], 1):
                coeffs[(t - k) % memory] = w
            cached = self._cache[key] = torch.tensor(coeffs, dtype=like.dtype, device=like.device)
        return cached

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure_loss(closure)
        for group, params in groups_with_grads(self):
            memory = group["window"] - 1
            for p in params:
                g = p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["history"] = p.new_zeros((memory, *p.shape))
                t = state["step"]
                if memory:  # D = g_t + sum_k w_k g_{t-k}: one pass over the ring buffer
                    direction = torch.tensordot(self._coefficients(group, t, p), state["history"], dims=1).add_(g)
                    state["history"][t % memory].copy_(g)
                else:
                    direction = g
                p.add_(direction, alpha=-group["lr"])
                state["step"] = t + 1
        return loss
