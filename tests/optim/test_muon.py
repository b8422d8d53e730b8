"""The muon option (optim/muon.py): which parameters go to Muon and which to AdamW, that the combination steps
exactly like the two torch optimizers built by hand, that schedules reach both halves, and state_dict; the
Newton-Schulz dtype: float32 gives bfloat16's orthogonalisation within bfloat16's precision, checked against the
exact iteration computed through the SVD, and "auto" follows the machine.
(torch.optim.Muon itself is checked against the published rule in test_torch_optim.py.)"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from optim import muon as muon_module
from optim.muon import Muon, newton_schulz, orthogonalization_dtype
from optim.param_groups import output_heads, param_groups, param_role
from schedules import Scheduler
from tasks.mnist_vae import VAE
from tests.conftest import compose_cfg
from tests.optim.harness import assert_converges, assert_state_dict_lockstep, quadratic, rosenbrock


class Tiny(nn.Module):
    def __init__(self, mark_head: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(1, 2, 3)
        self.head = nn.Linear(8, 5)
        self.aux = nn.Linear(8, 8)  # registered last: the default head rule would pick it
        if mark_head:
            self.head.is_output_head = True

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.hidden(self.embed(idx)))
        h = h + self.conv(h.reshape(-1, 1, h.shape[-1])).mean((1, 2)).reshape(*h.shape[:-1], 1)
        return self.head(self.aux(h).tanh())


def ids(params) -> set[int]:
    return {id(p) for p in params}


def halves(opt: Muon) -> tuple[set[int], set[int]]:
    muon = ids(p for g in opt.muon.param_groups for p in g["params"])
    adamw = ids(p for g in opt.adamw.param_groups for p in g["params"])
    return muon, adamw


@pytest.mark.parametrize("decay_bias_and_norm", [False, True])
def test_hidden_matrices_go_to_muon_everything_else_to_adamw(decay_bias_and_norm):
    model = Tiny(mark_head=True)
    opt = Muon(param_groups(model, decay_bias_and_norm=decay_bias_and_norm))
    muon, adamw = halves(opt)
    assert muon == ids([model.hidden.weight, model.aux.weight])
    assert adamw == ids(model.parameters()) - muon  # embedding, head (weight and bias), norm, conv, biases
    assert param_role(model.embed.weight) == "embedding" and param_role(model.head.weight) == "head"


def test_without_a_marked_head_the_last_linear_is_the_head():
    model = Tiny()
    assert output_heads(model) == [model.aux]
    muon, _ = halves(Muon(param_groups(model)))
    assert muon == ids([model.hidden.weight, model.head.weight])
    vae = VAE()
    assert output_heads(vae) == [vae.decoder[1]]  # the 400 -> 784 pixel logits
    muon, _ = halves(Muon(param_groups(vae)))
    assert muon == ids([vae.encoder[0].weight, vae.mu.weight, vae.logvar.weight, vae.decoder[0][0].weight])


def test_a_group_can_force_its_matrices_with_use_muon():
    a, b = nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(3, 3))
    muon, adamw = halves(Muon([{"params": [a]}, {"params": [b], "use_muon": False}]))
    assert muon == ids([a]) and adamw == ids([b])


def test_steps_exactly_like_torch_muon_and_adamw_side_by_side():
    """Per-group hyperparameters carry over: the no_decay group stays undecayed on both halves. In bfloat16 (what
    torch.optim.Muon always uses) our Muon half is torch's, bit for bit."""
    torch.manual_seed(0)
    model = Tiny(mark_head=True).double()
    twin = Tiny(mark_head=True).double()
    twin.load_state_dict(model.state_dict())
    opt = Muon(param_groups(model), lr=0.02, weight_decay=0.1, adamw_betas=(0.8, 0.9), adamw_eps=1e-6,
               ns_dtype="bfloat16")
    hidden = [twin.hidden.weight, twin.aux.weight]
    rest_decay = [twin.conv.weight, twin.head.weight]
    rest_no_decay = [p for p in twin.parameters() if id(p) not in ids(hidden + rest_decay)]
    ref_muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([{"params": rest_decay}, {"params": rest_no_decay, "weight_decay": 0.0}],
                                  lr=0.02, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    idx = torch.tensor([[1, 2, 3], [4, 5, 9]])
    for _ in range(3):
        for m, opts in ((model, [opt]), (twin, [ref_muon, ref_adamw])):
            for o in opts:
                o.zero_grad()
            m(idx).pow(2).mean().backward()
            for o in opts:
                o.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.hidden.weight, Tiny(mark_head=True).double().hidden.weight)


def test_a_schedule_reaches_both_halves():
    model = Tiny()
    opt = Muon(param_groups(model), lr=0.1)
    sched = Scheduler(lambda step: 0.5**step, opt)  # what the trainer uses
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    sched.step(1)
    opt.step()
    assert {g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups} == {0.05}


def test_converges():
    # An untagged [1, n] parameter is a matrix for Muon: normalized steps, so the tolerance is ~lr^2 scale.
    make = lambda lr: lambda ps: Muon(ps, lr=lr, weight_decay=0.0)  # noqa: E731
    assert_converges(make(0.03), quadratic, [0.0] * 4, steps=1000, tol=1e-2)
    assert_converges(make(0.02), rosenbrock, [-1.2, 1.0], steps=2000, tol=1e-2)


def test_state_dict_lockstep():
    # The harness's groups: 2-D weights (to Muon) and 1-D biases (to AdamW).
    assert_state_dict_lockstep(lambda ps: Muon(ps, lr=0.01, weight_decay=0.01))


@pytest.mark.parametrize("kwargs,bad", [
    ({"lr": -1.0}, "Invalid lr: -1.0"),
    ({"momentum": 1.0}, "Invalid momentum: 1.0"),
    ({"ns_steps": 0}, "Invalid ns_steps: 0"),
    ({"adjust_lr_fn": "x"}, "Invalid adjust_lr_fn: 'x'"),
    ({"adamw_betas": (0.9, 1.0)}, "Invalid adamw_betas"),
    ({"ns_dtype": "float16"}, "Invalid ns_dtype: 'float16'"),
])
def test_rejects_bad_hyperparameters(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        Muon([nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_option_builds_it():
    cfg = compose_cfg("optimizer=muon", "regularize.weight_decay=0.1")
    opt = instantiate(cfg.optimizer)(param_groups(VAE()))
    assert isinstance(opt, Muon) and opt.defaults["adjust_lr_fn"] == "match_rms_adamw"
    assert {g["weight_decay"] for g in opt.muon.param_groups} == {0.1}
    assert {g["weight_decay"] for g in opt.adamw.param_groups} == {0.1, 0.0}


# ---- the Newton-Schulz dtype --------------------------------------------------------------------------------
def exact_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The iteration in exact arithmetic, through the SVD: X = G/||G||_F has singular values s/||s||, each step
    maps a singular value x to ax + bx^3 + cx^5 (Jordan's a, b, c) and keeps the singular vectors."""
    a, b, c = 3.4445, -4.7750, 2.0315
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    x = s / s.norm()
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return u @ torch.diag(x) @ vh


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


BF16_EPS = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)


@pytest.mark.parametrize("shape", [(128, 512), (512, 128), (384, 128), (64, 64)])
def test_float32_orthogonalises_like_bfloat16_within_its_precision(shape):
    """A gradient-like matrix (singular values 1 ... 0.01). bfloat16 Newton-Schulz (torch.optim.Muon's, bit for bit)
    is the exact iteration up to its rounding: 15 rounded matrix products over 5 steps, bounded here by 16 unit
    roundoffs (measured: 5-9). float32 is the exact iteration to 1e-5, so the two agree to bfloat16's precision and
    float32 is the more accurate one."""
    g = torch.Generator().manual_seed(0)
    rows, cols = shape
    k = min(shape)
    u = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))[0]
    grad = ((u * torch.logspace(0, -2, k, dtype=torch.float64)) @ v.T).float()
    exact = exact_newton_schulz(grad)
    o32 = newton_schulz(grad, 5, torch.float32)
    o16 = newton_schulz(grad, 5, torch.bfloat16)
    torch_o16 = torch.optim._muon._zeropower_via_newtonschulz(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert o32.dtype == torch.float32 and o16.dtype == torch.bfloat16 and o32.shape == grad.shape
    assert torch.equal(o16, torch_o16)
    assert rel_err(o32, exact) < 1e-5
    assert BF16_EPS < rel_err(o16, exact) < 16 * BF16_EPS  # bfloat16 was really used, and it is bounded
    assert rel_err(o32, o16) < 16 * BF16_EPS
    assert rel_err(o32, exact) < rel_err(o16, exact) / 1000


@pytest.fixture
def capabilities(monkeypatch):
    """Pretend to be a CPU with the given feature flags (torch.cpu.get_capabilities), cache cleared."""
    def pretend(**flags: bool) -> None:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", **flags})
        muon_module.cpu_has_native_bf16.cache_clear()

    yield pretend
    muon_module.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("flags,expected", [
    ({"avx2": True, "avx512_f": True}, torch.float32),  # AVX2 / AVX-512 without BF16: bf16 is emulated
    ({"avx2": True, "avx512_f": True, "avx512_bf16": True}, torch.bfloat16),
    ({"avx2": True, "amx_bf16": True, "amx_tile": True}, torch.bfloat16),
    ({"neon": True, "bf16": True}, torch.bfloat16),  # Arm with the BF16 extension
    ({"neon": True}, torch.float32),
])
def test_auto_dtype_follows_the_cpu(capabilities, flags, expected):
    capabilities(**flags)
    assert orthogonalization_dtype(torch.device("cpu")) == expected
    assert orthogonalization_dtype(torch.device("cuda", 0)) == torch.bfloat16  # tensor cores: always bf16
    assert orthogonalization_dtype(torch.device("mps")) == torch.float32
    assert orthogonalization_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16  # forced
    assert orthogonalization_dtype(torch.device("cpu"), "float32") == torch.float32


def test_this_machine_is_read_once():
    muon_module.cpu_has_native_bf16.cache_clear()
    caps = torch.cpu.get_capabilities()
    native = any(caps.get(f, False) for f in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    assert orthogonalization_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert muon_module.cpu_has_native_bf16.cache_info().misses == 1
    orthogonalization_dtype(torch.device("cpu"))
    assert muon_module.cpu_has_native_bf16.cache_info().misses == 1


@pytest.mark.parametrize("flags,forced", [({"avx2": True}, "float32"), ({"avx512_bf16": True}, "bfloat16")])
def test_an_auto_step_is_the_step_in_the_machines_dtype(capabilities, flags, forced):
    """What the optimizer does, not just what the helper says: an "auto" step on a CPU with these flags is
    bit for bit the step with the dtype forced; the two dtypes give different steps."""
    capabilities(**flags)
    results = {}
    for ns_dtype in ("auto", "float32", "bfloat16"):
        torch.manual_seed(0)
        model = Tiny(mark_head=True)
        opt = Muon(param_groups(model), lr=0.02, ns_dtype=ns_dtype)
        for _ in range(2):
            opt.zero_grad()
            model(torch.tensor([[1, 2, 3], [4, 5, 9]])).pow(2).mean().backward()
            opt.step()
        results[ns_dtype] = model.hidden.weight.detach().clone()
    assert torch.equal(results["auto"], results[forced])
    assert not torch.equal(results["float32"], results["bfloat16"])


def test_a_checkpoint_without_ns_dtype_loads(capabilities):
    """state_dicts written before ns_dtype existed resume with "auto"."""
    capabilities(avx2=True)
    model = Tiny(mark_head=True)
    opt = Muon(param_groups(model), lr=0.02)
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    sd = opt.state_dict()
    for group in sd["param_groups"] + sd["muon"]["param_groups"]:
        del group["ns_dtype"]
    fresh = Muon(param_groups(model), lr=0.02)
    fresh.load_state_dict(sd)
    fresh.step()
    assert {g["ns_dtype"] for g in fresh.param_groups + fresh.muon.param_groups} == {"auto"}


@pytest.mark.parametrize("nesterov,adjust", [(True, "match_rms_adamw"), (False, "original")])
def test_float32_steps_follow_the_published_rule_closely(nesterov, adjust):
    """Three steps on a tall matrix: B <- mu B + (1-mu) g (the EMA form torch uses), O = NS5(g + mu (B - g)) or NS5(B)
    computed exactly through the SVD, p <- p (1 - lr wd) - lr s O. In float32 the Muon half follows it to 1e-5 of a
    step; torch's bfloat16 only to ~10% (test_torch_optim.py)."""
    from optim.muon import MuonHalf

    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    grads = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    lr, wd, mu = 0.05, 0.1, 0.95
    s = 0.2 * 6**0.5 if adjust == "match_rms_adamw" else (6 / 4) ** 0.5
    p = torch.nn.Parameter(p0.clone())
    opt = MuonHalf([p], ns_dtype="float32", lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov,
                   adjust_lr_fn=adjust)
    want, buf = p0.clone(), torch.zeros_like(p0)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        buf = mu * buf + (1 - mu) * grad
        want = want * (1 - lr * wd) - lr * s * exact_newton_schulz(grad + mu * (buf - grad) if nesterov else buf)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-5 * lr * s)


def test_same_shaped_matrices_are_orthogonalised_each_on_its_own():
    """In float32 the Muon half iterates matrices of one oriented shape as a stack (a tall [6, 4] transposed joins
    the wide [4, 6]): each still follows the published rule with its own singular values, its own momentum and its
    own scale s (0.2 sqrt(6) for both orientations, sqrt(max(1, rows/cols)) with "original"); a [5, 5] and a
    [3, 6] matrix of the same group take their own stacks. One parameter has no gradient at step 2 and is left
    alone."""
    from optim.muon import MuonHalf

    g = torch.Generator().manual_seed(5)
    shapes = [(6, 4), (4, 6), (6, 4), (5, 5), (3, 6)]
    starts = [torch.randn(*sh, generator=g, dtype=torch.float64) * scale
              for sh, scale in zip(shapes, (1.0, 10.0, 0.1, 1.0, 3.0))]
    grads = [[torch.randn(*sh, generator=g, dtype=torch.float64) for sh in shapes] for _ in range(3)]
    lr, wd, mu = 0.05, 0.1, 0.95
    for adjust in ("match_rms_adamw", "original"):
        params = [torch.nn.Parameter(s.clone()) for s in starts]
        opt = MuonHalf(params, ns_dtype="float32", lr=lr, weight_decay=wd, momentum=mu, nesterov=True,
                       adjust_lr_fn=adjust)
        for t, step_grads in enumerate(grads):
            for k, (p, grad) in enumerate(zip(params, step_grads)):
                p.grad = None if (t == 1 and k == 2) else grad.clone()
            opt.step()
        for k, (start, shape) in enumerate(zip(starts, shapes)):
            rows, cols = shape
            s = 0.2 * max(rows, cols) ** 0.5 if adjust == "match_rms_adamw" else max(1.0, rows / cols) ** 0.5
            want, buf = start.clone(), torch.zeros_like(start)
            for t, step_grads in enumerate(grads):
                if t == 1 and k == 2:
                    continue
                grad = step_grads[k]
                buf = mu * buf + (1 - mu) * grad
                want = want * (1 - lr * wd) - lr * s * exact_newton_schulz(grad + mu * (buf - grad))
            torch.testing.assert_close(params[k].detach(), want, rtol=0, atol=1e-5 * lr * s, msg=f"{adjust} {k}")
