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

rule="zhou": Zhou et al.'s FCGD_G-L coefficients and disturbance, as restated by a third-party summary of the paper
(junaidaliop.github.io/zij/math/fcgdgl; the paper's full text could not be read here, its abstract names the same
elements: a 10-step memory, a recursion that removes the Gamma function, a small random disturbance):

    w_0 = 1,  w_j = w_{j-1} (1 - (a + 1)/(j + 1))  (j >= 1),  0 < a <= 1,  D = g_t + sum_{j>=1} c_j w_j g_{t-j}

with c a mask of ones with one zero at a random place each step (`drop`). The weights are positive and fall to
0 at a = 1, where the rule is plain gradient descent; the paper's 10 memory terms are window=11. The dropped term
is drawn from a generator seeded with (seed, step), so a run and its resumption drop the same terms.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

import torch

from optim.core import closure_loss, groups_with_grads, int_at_least, nonnegative, one_of, require

RULES = ("textbook", "zhou")


def gl_weights(order: float, window: int, rule: str = "textbook") -> list[float]:
    """The coefficients w_0 .. w_{window-1} of `order`: w_0 = 1 and w_k = w_{k-1}(1 - (order+1)/k) (the
    Grunwald-Letnikov binomials, "textbook") or w_k = w_{k-1}(1 - (order+1)/(k+1)) (Zhou et al., "zhou")."""
    shift = 1 if rule == "zhou" else 0
    weights = [1.0]
    for k in range(1, window):
        weights.append(weights[-1] * (1.0 - (order + 1.0) / (k + shift)))
    return weights


def dropped_term(seed: int, step: int, window: int) -> int:
    """The memory term (1 .. window-1) that rule="zhou" with drop=True leaves out at `step`."""
    return random.Random(seed * 1000003 + step).randrange(1, window)


class GLFractional(torch.optim.Optimizer):
    """SGD on the Grunwald-Letnikov fractional difference of the gradient sequence (see the module docstring)."""

    def __init__(self, params: Iterable[Any], lr: float = 0.01, order: float = -0.5, window: int = 10,
                 weight_decay: float = 0.0, rule: str = "textbook", drop: bool = False, seed: int = 0) -> None:
        nonnegative(lr=lr, weight_decay=weight_decay)
        one_of("rule", rule, RULES)
        if rule == "zhou":
            require(0.0 < order <= 1.0, "order", order, "want 0 < order <= 1 with rule=zhou")
        else:
            require(-1.0 < order < 1.0, "order", order, "want -1 < order < 1")
        require(not drop or rule == "zhou", "drop", drop, "the random drop is part of rule=zhou only")
        int_at_least("window", window, 1)
        super().__init__(params, dict(lr=lr, order=order, window=window, weight_decay=weight_decay, rule=rule,
                                      drop=drop, seed=seed))
        self._cache: dict[tuple, torch.Tensor] = {}

    def _coefficients(self, group: dict[str, Any], t: int, like: torch.Tensor) -> torch.Tensor:
        """w_1 .. w_{window-1} placed at the ring slots of g_{t-1} .. g_{t-window+1} (slot of g_{t-k}: (t-k) % memory).
        One tensor per ring position, built once per (order, window, dtype, device) and reused."""
        memory = group["window"] - 1
        rule = group.get("rule", "textbook")  # checkpoints from before the option
        dropped = dropped_term(group["seed"], t, group["window"]) if group.get("drop") else 0
        key = (group["order"], group["window"], rule, dropped, t % memory, like.dtype, like.device)
        cached = self._cache.get(key)
        if cached is None:
            coeffs = [0.0] * memory
            for k, w in enumerate(gl_weights(group["order"], group["window"], rule)[1:], 1):
                coeffs[(t - k) % memory] = 0.0 if k == dropped else w
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
