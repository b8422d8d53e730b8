"""The VAE task: loss against an independent formula, latent PCA, norms inside the MLP."""

from __future__ import annotations

import math
import re

import pytest
import torch

from tasks.mnist_vae import VAE, principal_components, vae_loss
from tasks.norm import norm_layer


def test_vae_loss_is_bce_plus_kld_per_image():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 784, generator=g, dtype=torch.float64)
    x = torch.rand(3, 784, generator=g, dtype=torch.float64)
    mu = torch.randn(3, 20, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 20, generator=g, dtype=torch.float64)
    got = vae_loss(logits, x, mu, logvar)
    for i in range(3):  # written out element by element from the definitions
        prob = [1 / (1 + math.exp(-v)) for v in logits[i].tolist()]
        bce = -sum(t * math.log(q) + (1 - t) * math.log(1 - q) for t, q in zip(x[i].tolist(), prob))
        kld = -0.5 * sum(1 + lv - m * m - math.exp(lv) for m, lv in zip(mu[i].tolist(), logvar[i].tolist()))
        assert math.isclose(got[i].item(), bce + kld, rel_tol=1e-9)


def test_principal_components_match_the_covariance_eigenvectors():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 5, generator=g, dtype=torch.float64) @ torch.diag(torch.tensor([5.0, 3.0, 1, 0.5, 0.1],
                                                                                     dtype=torch.float64))
    pcs = principal_components(z).double()
    centred = z - z.mean(0)
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred)
    expected = centred @ eigvecs[:, [-1, -2]]  # two largest eigenvalues
    for k in range(2):  # each component is defined up to sign
        assert torch.allclose(pcs[:, k].abs(), expected[:, k].abs(), atol=1e-5)
    two = torch.randn(10, 2, generator=g)
    assert torch.equal(principal_components(two), two)


def test_vae_shapes_and_norm_placement():
    model = VAE(norm=lambda n: norm_layer(n, "layernorm"), dropout=0.1)
    logits, mu, logvar = model(torch.rand(4, 784))
    assert logits.shape == (4, 784) and mu.shape == logvar.shape == (4, 20)
    assert [type(m).__name__ for m in model.encoder] == ["Linear", "LayerNorm", "ReLU", "Dropout"]
    assert sum(p.numel() for p in VAE().parameters()) == 652_824  # 784-400-20-400-784 of pytorch/examples


def test_norm_layer_kinds():
    x = torch.randn(6, 4, 5, 5)
    bn = norm_layer(4, "batchnorm", spatial=True)
    assert isinstance(bn, torch.nn.BatchNorm2d)
    ln = norm_layer(4, "layernorm", spatial=True)
    y = ln(x)  # normalises the channel vector at each position
    assert torch.allclose(y.mean(1), torch.zeros(6, 5, 5), atol=1e-5)
    rms = norm_layer(4, "rmsnorm")
    v = torch.randn(3, 4)
    assert torch.allclose(rms(v), v / torch.sqrt((v * v).mean(1, keepdim=True) + 1e-5), atol=1e-6)
    assert isinstance(norm_layer(4, "none"), torch.nn.Identity)


# -- the validation split (selection on validation, the test set scored once at the end) ------------------------


def test_the_validation_split_is_carved_from_training_and_fixed_across_trainer_seeds(mnist_root):
    from tasks.data import load_mnist
    from tests.conftest import compose_cfg
    from trainer.build import build

    raw_train = load_mnist(mnist_root, download=False)[0].reshape(60000, 784)
    tasks = [build(compose_cfg(f"data.root={mnist_root}", f"trainer.seed={seed}", "trainer.device=cpu")).task
             for seed in (0, 7)]
    for task in tasks:
        val, train = set(task.val_indices.tolist()), set(task.train_indices.tolist())
        assert len(val) == 5000 and len(train) == 55000 and not val & train and val | train == set(range(60000))
        assert task.train_size == 55000
        assert torch.equal(task.val_x.cpu(), raw_train[task.val_indices])  # the images those indices name
        assert torch.equal(task.train_x.cpu(), raw_train[task.train_indices])
    assert torch.equal(tasks[0].val_indices, tasks[1].val_indices)  # trainer.seed does not move the split


def _mean_vae_loss(model, images, seed, batch=1000):
    """Per-image loss of uint8 images, computed here with the reparameterisation noise drawn from `seed`, in the
    order the trainer's evaluation draws it (a fresh seed, then the images in order, `batch` at a time)."""
    torch.manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i : i + batch].float() / 255
            logits, mu, logvar = model(x)
            total += vae_loss(logits, x, mu, logvar).double().sum().item()
    return total / len(images)


def test_evaluations_report_val_loss_and_the_test_set_is_scored_once_at_the_end(mnist_root, tmp_path):
    import json

    from tasks.data import load_mnist
    from tests.conftest import compose_cfg
    from trainer.checkpoint import load_checkpoint
    from trainer.run import run

    cfg = compose_cfg(f"data.root={mnist_root}", "trainer.device=cpu", "trainer.max_steps=4", "trainer.eval_interval=2",
                      "trainer.log_interval=2", "trainer.pictures=false", "trainer.histogram_interval=0",
                      "trainer.progress=off", "trainer.seed=3")
    assert cfg.monitor.metric == "val_loss" and cfg.monitor.mode == "min"
    final = run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/val_loss" in r] == [2, 4]
    assert not any(k.startswith("eval/test") for r in rows for k in r)  # no evaluation looks at the test set
    assert set(json.loads((tmp_path / "final_metrics.json").read_text())) >= {"val_loss", "test_loss"}

    model = VAE()
    model.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"])
    model.eval()
    train_x, _, test_x, _ = load_mnist(mnist_root, download=False)
    val_indices = build_split_indices(mnist_root)
    # The trainer evaluates on a private stream seeded with trainer.seed + 1 (trainer/loop.py).
    assert final["val_loss"] == pytest.approx(_mean_vae_loss(model, train_x.reshape(-1, 784)[val_indices], 4),
                                              rel=1e-9)
    assert final["test_loss"] == pytest.approx(_mean_vae_loss(model, test_x.reshape(-1, 784), 4), rel=1e-9)


def build_split_indices(root):
    from tasks.mnist_vae import MnistVAE

    task = MnistVAE(str(root), download=False)
    task.setup(torch.device("cpu"))
    return task.val_indices


def test_val_size_0_is_the_pytorch_examples_setup(mnist_root):
    """No split: all 60000 images train in their file order (so recipe=mnist_vae_baseline's figure stands),
    evaluations score the test set and nothing is left for the end."""
    from tasks.data import load_mnist
    from tasks.mnist_vae import MnistVAE
    from tests.conftest import compose_cfg

    task = MnistVAE(str(mnist_root), download=False, val_size=0)
    task.setup(torch.device("cpu"))
    assert torch.equal(task.train_x, load_mnist(mnist_root, download=False)[0].reshape(60000, 784))
    model = VAE().eval()
    assert set(task.evaluate(model)) == {"test_loss"} and task.final_metrics(model) == {}
    cfg = compose_cfg("recipe=mnist_vae_baseline")
    assert cfg.task.val_size == 0 and cfg.monitor.metric == "test_loss" and cfg.expect.metric == "test_loss"


def test_every_task_monitors_a_validation_metric():
    from tests.conftest import ROOT, compose_cfg

    for task in sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml")):
        assert compose_cfg(f"task={task}").monitor.metric.startswith("val_"), task


@pytest.mark.parametrize(("overrides", "message"), [
    (("task.val_size=0",), "monitor.metric='val_loss': the task tasks.mnist_vae.MnistVAE does not report it; its "
                           "evaluate() reports test_loss; set monitor.metric=test_loss"),
    (("task=mnist_cnn", "task.val_size=0"), "task.val_size=0: must be an int in [1, 59999] (the CNN evaluates on "
                                            "that split)"),
])
def test_no_validation_split_with_a_validation_monitor_is_a_config_error(overrides, message):
    from config import validate
    from core.errors import ConfigError
    from tests.conftest import compose_cfg

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_cfg(*overrides))
    validate(compose_cfg("task.val_size=0", "monitor.metric=test_loss"))  # the baseline's setup is fine
