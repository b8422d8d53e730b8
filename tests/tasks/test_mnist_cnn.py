"""The MNIST CNN task: split, loss with label smoothing, accuracy, test set scored once at the end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tasks.mnist_cnn import CNN, MnistCNN
from tasks.norm import norm_layer
from tests.conftest import run_cli


def test_label_smoothing_matches_its_definition():
    task = MnistCNN("unused", label_smoothing=0.1)
    logits = torch.tensor([[2.0, 0.0, -1.0] + [0.0] * 7])
    model = lambda x: logits  # noqa: E731
    got = task.loss(model, (None, torch.tensor([0]))).item()
    logp = torch.log_softmax(logits, 1)[0].tolist()
    expected = -(0.9 * logp[0] + 0.1 * sum(logp) / 10)  # (1-e) on the label + e spread over the 10 classes
    assert math.isclose(got, expected, rel_tol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        MnistCNN("unused", label_smoothing=1.5)


def test_split_is_disjoint_and_sized(mnist_root):
    task = MnistCNN(str(mnist_root), val_size=5000)
    task.setup(torch.device("cpu"))
    assert task.train_size == 55000 and len(task.val_x) == 5000 and len(task.test_x) == 10000
    train = {hash(x.numpy().tobytes()) for x in task.train_x[:2000]}
    assert not train & {hash(x.numpy().tobytes()) for x in task.val_x}


@pytest.mark.parametrize("norm", ["none", "batchnorm", "layernorm", "rmsnorm"])
def test_cnn_with_each_norm(norm):
    model = CNN(lambda n, spatial=False: norm_layer(n, norm, spatial=spatial), dropout=0.25)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in CNN().parameters()) == 1_199_882  # pytorch/examples mnist Net


@pytest.mark.slow
def test_cli_run_scores_validation_then_test(mnist_root, tmp_path):
    out = run_cli("recipe=mnist_cnn", f"data.root={mnist_root}", "trainer.max_steps=30", "trainer.eval_interval=10",
                  "task.val_size=1000", "trainer.log_interval=10", "early_stop.patience=1", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["test_acc"] > 0.5 and 0 < final["val_acc"] <= 1
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("eval/test_acc" not in e for e in evals)  # the test set is not looked at during training
