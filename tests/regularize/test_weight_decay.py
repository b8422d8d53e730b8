"""Coupled weight decay is L2 in the loss; decoupled is the optimizer's own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optim.param_groups import param_groups
from regularize.weight_decay import coupled_weight_decay, l2_penalty
from tests.conftest import compose_cfg
from trainer.checkpoint import load_checkpoint
from trainer.run import run


def test_coupled_gradient_equals_autograd_of_the_penalised_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    opt = torch.optim.AdamW(param_groups(model), lr=0.1, weight_decay=0.3)
    decayed = list(opt.param_groups[0]["params"])
    model(x).pow(2).mean().backward()
    coupled_weight_decay(opt, "coupled", 0.3)(list(model.parameters()))
    ours = [p.grad.clone() for p in model.parameters()]
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)  # the optimizer no longer decays

    model.zero_grad()
    (model(x).pow(2).mean() + l2_penalty(decayed, 0.3)).backward()  # the definition, through autograd
    for a, b in zip(ours, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_sgd_coupled_equals_torch_sgd_weight_decay(mnist_root, tmp_path):
    """torch.optim.SGD's weight_decay is itself L2 (g + wd*p): the two modes must agree to the bit."""
    common = ("optimizer=sgd", "optimizer.lr=0.01", "regularize.weight_decay=0.5", "trainer.max_steps=5",
              f"data.root={mnist_root}", "trainer.progress=off", "trainer.pictures=false",
              "trainer.histogram_interval=0")
    run(compose_cfg(*common, "regularize.weight_decay_mode=coupled"), tmp_path / "c")
    run(compose_cfg(*common, "regularize.weight_decay_mode=decoupled"), tmp_path / "d")
    run(compose_cfg(*common, "regularize.weight_decay=0"), tmp_path / "none")
    c, d, none = (load_checkpoint(tmp_path / k / "checkpoints" / "last.pt")["model"] for k in ("c", "d", "none"))
    assert all(torch.equal(c[k], d[k]) for k in c)
    assert not all(torch.equal(c[k], none[k]) for k in c)


def test_coupled_l2_is_part_of_the_gradient_that_clipping_sees(tmp_path):
    """Pinned by hand: g = dloss/dw + wd*w, logged as train/grad_norm, then clipped to max_norm, then SGD."""
    import json

    lr, wd, max_norm, steps = 0.05, 0.5, 15.0, 4
    cfg = compose_cfg("optimizer=sgd", f"optimizer.lr={lr}", "schedule=constant", f"trainer.max_steps={steps}",
                      "clip=norm", f"clip.norm.max_norm={max_norm}", f"regularize.weight_decay={wd}",
                      "regularize.weight_decay_mode=coupled", "trainer.log_interval=1", "trainer.progress=off",
                      "trainer.histogram_interval=0", "trainer.pictures=false", "monitor.metric=distance")
    cfg.task = {"_target_": "tests.toy.LineTask", "target": 10.0, "batch_size": 4}
    run(cfg, tmp_path)
    w, norms, clipped = torch.zeros(1, 1), [], []
    for _ in range(steps):  # loss (w - 10)^2 per sample, mean over the batch
        g = 2 * (w - 10.0) + wd * w
        norms.append(g.abs().item())
        g = g * torch.clamp(max_norm / (g.abs() + 1e-6), max=1.0)
        clipped.append(g.abs().item())
        w = w - lr * g
    got = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]["w"]
    torch.testing.assert_close(got, w, rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/grad_norm" in r]
    assert [r["train/grad_norm"] for r in logged] == pytest.approx(norms, rel=1e-6)  # 20, 18.125: wd*w included
    assert [r["train/grad_norm_after_transforms"] for r in logged] == pytest.approx(clipped, rel=1e-6)
