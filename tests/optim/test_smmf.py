"""SMMF (optim/smmf.py): square matricization, rank-1 factors and 1-bit signs by hand; state bytes per
parameter."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from optim.smmf import SMMF, pack_signs, square_shape
from tests.conftest import compose_cfg
from tests.optim.harness import (
    MATRIX,
    MATRIX_GRADS,
    VECTOR,
    VECTOR_GRADS,
    assert_converges,
    assert_state_dict_lockstep,
    check_against,
    quadratic,
    rosenbrock,
    trajectory,
)


@pytest.mark.parametrize("numel,shape", [(1, (1, 1)), (6, (3, 2)), (7, (7, 1)), (12, (4, 3)), (16, (4, 4)),
                                         (400 * 784, (560, 560))])
def test_nearest_square_matrix(numel, shape):
    assert square_shape(numel) == shape


def unpack_signs(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_signs: the first `numel` bits as a bool tensor (little-endian within the byte)."""
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:numel].bool()


def test_signs_pack_eight_to_a_byte_and_round_trip():
    torch.manual_seed(0)
    signs = torch.rand(3, 7) > 0.5
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.numel() == 3  # 21 bits in 3 bytes
    assert torch.equal(unpack_signs(packed, 21).view(3, 7), signs)


def ref_smmf(p, grads, lr, beta=0.9, eps=1e-8, wd=0.0, decay=-0.5, growth=0.999):
    """The matrix view [n, m] of p; M and V carried between steps only as (row sums, column sums / total) and
    M's signs; each step decompresses, updates, steps with the fresh M and V, and compresses."""
    n, m = square_shape(p.numel())

    def factors(x):  # x >= 0
        return x.sum(1), x.sum(0) / x.sum() if x.sum() > 0 else x.sum(0)

    out = []
    m_row, m_col, sign = torch.zeros(n, dtype=p.dtype), torch.zeros(m, dtype=p.dtype), torch.ones(n, m) > 0
    v_row, v_col = torch.zeros(n, dtype=p.dtype), torch.zeros(m, dtype=p.dtype)
    for t, g in enumerate(grads, 1):
        g = g.reshape(n, m)
        b1, b2 = beta * growth ** (t - 1), 1 - t**decay
        magnitude = torch.outer(m_row, m_col)
        mom = b1 * torch.where(sign, magnitude, -magnitude) + (1 - b1) * g
        var = b2 * torch.outer(v_row, v_col) + (1 - b2) * g * g
        p = p * (1 - lr * wd) - lr * (mom / (var.sqrt() + eps)).reshape(p.shape)
        sign = mom > 0
        m_row, m_col = factors(mom.abs())
        v_row, v_col = factors(var)
        out.append(p)
    return out


def test_first_three_steps_match_the_rule():
    # MATRIX [2, 3] is factored as [3, 2]; VECTOR (3 entries) as [3, 1].
    make = lambda ps: SMMF(ps, lr=0.1, beta=0.8, weight_decay=0.05)  # noqa: E731
    grads = list(zip(MATRIX_GRADS, VECTOR_GRADS))
    actual = trajectory(make, [MATRIX, VECTOR], grads, lr=0.2, weight_decay=0.5, decay=-0.8, growth=0.9)
    expected = list(zip(ref_smmf(MATRIX, MATRIX_GRADS, lr=0.2, beta=0.8, wd=0.5, decay=-0.8, growth=0.9),
                        ref_smmf(VECTOR, VECTOR_GRADS, lr=0.1, beta=0.8, wd=0.05)))
    check_against(actual, expected)


def test_first_step_closed_form():
    """At t = 1 beta2_1 = 0 and M starts at 0: the step is -lr*(1-beta)*g/(|g| + eps), for any g."""
    p = torch.nn.Parameter(MATRIX.clone())
    opt = SMMF([p], lr=0.01, beta=0.9, eps=0.0)
    p.grad = MATRIX_GRADS[0].clone()
    opt.step()
    torch.testing.assert_close(p.detach() - MATRIX, -0.01 * 0.1 * MATRIX_GRADS[0].sign(), rtol=1e-12, atol=0)


def test_state_is_about_an_eighth_of_a_byte_per_parameter():
    p = torch.nn.Parameter(torch.zeros(400, 784))
    opt = SMMF([p])
    p.grad = torch.randn(400, 784)
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t))
    # [400, 784] is viewed as [560, 560]: 560*560/8 sign bytes + 4 float32 factor vectors of 560 entries.
    assert state_bytes == 560 * 560 // 8 + 4 * 560 * 4
    assert state_bytes / p.numel() < 0.16  # bytes per parameter (Adam: 8)


def test_converges():
    assert_converges(lambda ps: SMMF(ps, lr=3e-3), quadratic, [0.0] * 4, steps=1000, tol=1e-6)
    assert_converges(lambda ps: SMMF(ps, lr=0.01), rosenbrock, [-1.2, 1.0], steps=1000, tol=1e-3)


def test_state_dict_lockstep():
    assert_state_dict_lockstep(lambda ps: SMMF(ps, lr=0.01, weight_decay=0.01))


@pytest.mark.parametrize("kwargs,bad", [
    ({"lr": -1.0}, "Invalid lr: -1.0"),
    ({"beta": 1.0}, "Invalid beta: 1.0"),
    ({"decay": 0.5}, "Invalid decay: 0.5"),
    ({"growth": 2.0}, "Invalid growth: 2.0"),
    ({"weight_decay": -1.0}, "Invalid weight_decay: -1.0"),
])
def test_rejects_bad_hyperparameters(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        SMMF([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_option_builds_it():
    opt = instantiate(compose_cfg("optimizer=smmf").optimizer)([torch.nn.Parameter(torch.zeros(2, 2))])
    assert isinstance(opt, SMMF) and opt.defaults["decay"] == -0.5
