"""SOAP and Shampoo (optim/preconditioned.py) against the authors' update rules, re-implemented here from their
code: SOAP from nikhilvyas/SOAP soap.py (commit a1e5535), Shampoo from facebookresearch/optimizers
distributed_shampoo (commit f606606); routing, state_dict round trip."""

from __future__ import annotations

import pytest
import torch

from optim.preconditioned import SOAP, Shampoo
from tests.optim.harness import assert_state_dict_lockstep, check_against, stepped

F64 = torch.float64


def grads(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(steps)]


# -- SOAP: the authors' soap.py, for a 2-D tensor with no dimension above max_precond_dim, merge_dims=False -----
def ref_soap(p, gs, lr, betas, eps, wd, freq):
    """soap.py step() lines 121-210 with update_preconditioner (268-307), get_orthogonal_matrix (337-370) and
    get_orthogonal_matrix_QR (373-430). The first call only accumulates GG and takes Q from eigh (no move); from
    then on exp_avg lives in the eigenbasis and is rotated when Q is refreshed (every `freq` steps, by one power
    iteration + QR in float32, columns sorted by the estimated eigenvalues, exp_avg_sq permuted alike)."""
    b1, b2 = betas
    p = p.clone()
    gg = [torch.zeros(n, n, dtype=F64) for n in p.shape]
    q = None
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    step = 0
    out = []

    def project(x, qs):  # soap.py 240-266: contract each dimension with Q (dims [[0], [0]]): Q_L^T x Q_R
        return qs[0].T @ x @ qs[1]

    def project_back(x, qs):  # soap.py 309-334: Q_L x Q_R^T
        return qs[0] @ x @ qs[1].T

    def update_preconditioner(g):
        nonlocal q, m, v
        if q is not None:
            m = project_back(m, q)
        gg[0].lerp_(g @ g.T, 1 - b2)  # shampoo_beta = betas[1] (line 145)
        gg[1].lerp_(g.T @ g, 1 - b2)
        if q is None:
            # eigh in float32 as the authors' (m.data.float() for a non-float32 tensor), eigenvalues descending
            q = [torch.flip(torch.linalg.eigh(a.float() + 1e-30 * torch.eye(len(a)))[1], [1]).to(F64) for a in gg]
        if step > 0 and step % freq == 0:
            new_q = []
            for dim, (a, o) in enumerate(zip(gg, q)):
                a32, o32 = a.float(), o.float()
                order = torch.argsort(torch.diag(o32.T @ a32 @ o32), descending=True)
                v = v.index_select(dim, order)
                new_q.append(torch.linalg.qr(a32 @ o32[:, order])[0].to(F64))
            q = new_q
        if step > 0:
            m = project(m, q)

    for g in gs:
        if q is None:
            update_preconditioner(g)
            out.append([p.clone()])
            continue
        gp = project(g, q)
        step += 1
        m = b1 * m + (1 - b1) * gp
        v = b2 * v + (1 - b2) * gp.square()
        size = lr * (1 - b2**step) ** 0.5 / (1 - b1**step)
        p = p - size * project_back(m / (v.sqrt() + eps), q)
        p = p - lr * wd * p
        update_preconditioner(g)
        out.append([p.clone()])
    return out


@pytest.mark.parametrize("shape", [(4, 4), (5, 5)])
def test_soap_matches_the_authors_rule_over_several_basis_refreshes(shape):
    start = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    gs = grads(shape, 9)
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, precondition_frequency=3)
    p = torch.nn.Parameter(start.clone())
    got = stepped(SOAP([p], **kw), [p], [[g] for g in gs])
    want = ref_soap(start, gs, lr=0.05, betas=(0.9, 0.95), eps=1e-8, wd=0.1, freq=3)
    # What differs: the library computes eigh in float64 where the authors cast to float32 (both do the QR in
    # float32), and keeps the first moment in the original space (projected every step) where the authors keep it
    # in the eigenbasis and rotate it at each refresh: equal up to float32 rounding of the bases (measured: at most
    # 4.5e-7 over 9 steps, moves of 0.3). Square matrices: the first basis comes from one gradient, and the null
    # space of a rank-deficient G G^T has no unique eigenbasis (any precision change rotates it).
    check_against(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0][0], start)  # the first step only builds the basis
    assert (got[-1][0] - start).abs().max() > 0.05


# -- Shampoo: distributed_shampoo at betas=(0, 1), no grafting, precondition_frequency=1 ------------------------
def inverse_root(a: torch.Tensor, root: int, eps: float) -> torch.Tensor:
    """matrix_functions.py matrix_inverse_root_from_eigendecomposition (lines 179-282), default perturbation:
    eigenvalues L <- L - min(lambda_min, 0) + eps, then Q diag(L^(-1/root)) Q^T."""
    lam, q = torch.linalg.eigh(a)
    lam = lam - min(lam.min().item(), 0.0) + eps
    return q * lam.pow(-1.0 / root).unsqueeze(0) @ q.T


def ref_shampoo(p, gs, lr, eps, wd):
    """distributed_shampoo.py _compute_search_directions (lines 1384-1500) with beta1 = 0 (no filtered gradient),
    beta2 = 1 (factor matrices summed: weighting factor 1, no bias correction; shampoo_preconditioner_list.py
    1410-1421, 1532-1538), the default inverse exponent 1/(2*order) = 1/4 for a matrix (shampoo_types.py 209-243),
    grafting_config=None, WeightDecayType.DECOUPLED (P <- P + wd*W, lines 1202-1245), then W <- W - lr*P."""
    p = p.clone()
    left = torch.zeros(p.shape[0], p.shape[0], dtype=F64)
    right = torch.zeros(p.shape[1], p.shape[1], dtype=F64)
    out = []
    for g in gs:
        left += g @ g.T
        right += g.T @ g
        direction = inverse_root(left, 4, eps) @ g @ inverse_root(right, 4, eps) + wd * p
        p = p - lr * direction
        out.append([p.clone()])
    return out


@pytest.mark.parametrize("shape", [(3, 5), (4, 4)])
def test_shampoo_matches_distributed_shampoo_at_matching_settings(shape):
    start = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    gs = grads(shape, 6, seed=3)
    p = torch.nn.Parameter(start.clone())
    got = stepped(Shampoo([p], lr=0.1, weight_decay=0.2, matrix_eps=1e-6), [p], [[g] for g in gs])
    # The library adds eps*I to the factors and takes roots by SVD; distributed_shampoo adds eps to the eigenvalues
    # of eigh: the same matrices in exact arithmetic (the factors are symmetric PSD); measured difference ~1e-15.
    check_against(got, ref_shampoo(start, gs, lr=0.1, eps=1e-6, wd=0.2), rtol=1e-9, atol=1e-11)


# -- routing and state ---------------------------------------------------------------------------------------
def tagged_model() -> torch.nn.Module:
    from optim.param_groups import tag_roles
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 6), torch.nn.LayerNorm(6),
                                torch.nn.Conv1d(6, 6, 3, padding=1), torch.nn.Linear(6, 7))
    tag_roles(model)
    return model


@pytest.mark.parametrize("cls", [SOAP, Shampoo])
def test_hidden_weights_go_to_the_preconditioner_the_rest_to_adamw(cls):
    model = tagged_model()
    emb, hidden, norm, conv, head = model
    opt = cls(model.parameters())
    inner = getattr(opt, cls.side)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(p for g in inner.param_groups for p in g["params"]) == ids([hidden.weight, conv.weight])
    assert ids(p for g in opt.adamw.param_groups for p in g["params"]) == ids(
        [emb.weight, hidden.bias, norm.weight, norm.bias, conv.bias, head.weight, head.bias])
    forced = cls([{"params": [hidden.weight], "use_preconditioner": False}, {"params": [head.weight]}])
    assert getattr(forced, cls.side) is None  # the head is never routed; hidden.weight was forced to AdamW


def test_shampoo_adamw_half_runs_at_its_lr_ratio_and_follows_a_schedule():
    model = tagged_model()
    opt = Shampoo(model.parameters(), lr=0.02, adamw_lr_ratio=0.5)
    opt.param_groups[0]["lr"] = 0.01  # what a schedule does
    x = torch.randint(0, 7, (5,))
    model[0](x).sum().backward()
    opt.step()
    assert opt.shampoo.param_groups[0]["lr"] == 0.01 and opt.adamw.param_groups[0]["lr"] == 0.005


@pytest.mark.parametrize("cls", [SOAP, Shampoo])
def test_state_dict_round_trip_continues_exactly(cls):
    assert_state_dict_lockstep(lambda groups: cls(groups, lr=0.01, weight_decay=0.1))


def test_shampoo_sends_tensors_wider_than_max_preconditioner_dim_to_adamw():
    wide, narrow = torch.nn.Parameter(torch.zeros(3, 9)), torch.nn.Parameter(torch.zeros(3, 8))
    opt = Shampoo([wide, narrow], max_preconditioner_dim=8)
    assert [p for g in opt.shampoo.param_groups for p in g["params"]] == [narrow]
    assert [p for g in opt.adamw.param_groups for p in g["params"]] == [wide]
