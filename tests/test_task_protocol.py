"""The task protocol (core/task.py) is checked, not trusted: a loss that is not per-sample, an evaluate() that does not
return metrics, a task without batch_size and a monitored metric the task never reports stop with a message that
names the rule and the fix (exit 2, no traceback), before a step is wasted."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from core.errors import TaskError
from core.task import Task
from tests.conftest import compose_cfg
from trainer.run import main, run

CONTRACT = "Per-sample training losses, shape [batch]"


class Fit(Task):
    """y = 2x on 64 points, a Linear(1, 1) fit by per-sample squared error. `form` breaks the loss contract on
    purpose; `loader` trains through the DataLoader path instead of the on-device one."""

    def __init__(self, batch_size: int = 8, size: int = 64, form: str = "per_sample", loader: bool = False,
                 batchnorm: bool = False, noise: float = 0.0) -> None:
        self.batch_size, self.size, self.form, self.loader, self.batchnorm = batch_size, size, form, loader, batchnorm
        self.noise = noise  # input noise drawn in loss() from the training RNG

    def setup(self, device: torch.device) -> None:
        self.x = torch.linspace(-1, 1, self.size).unsqueeze(1)
        self.y = 2 * self.x

    def train_dataset(self) -> TensorDataset | None:
        return TensorDataset(self.x, self.y) if self.loader else None

    @property
    def train_size(self) -> int:
        return self.size

    def train_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)) if self.batchnorm else nn.Linear(1, 1)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        x = x + self.noise * torch.randn_like(x) if self.noise else x
        per_sample = (model(x) - y).pow(2).mean(1)
        return {"per_sample": per_sample, "mean": per_sample.mean(), "short": per_sample[1:],
                "column": per_sample[:, None], "float": float(per_sample.sum())}[self.form]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"mse": (model(self.x) - self.y).pow(2).mean().item()}


def fit_cfg(*overrides: str, **task) -> object:
    cfg = compose_cfg("optimizer=sgd", "optimizer.lr=0.5", "schedule=constant", "trainer.max_steps=16",
                      "trainer.eval_interval=0", "trainer.progress=off", "trainer.histogram_interval=0",
                      "monitor.metric=mse", "monitor.mode=min", *overrides)
    cfg.task = {"_target_": f"{__name__}.Fit", **task}
    return cfg


def exits_2(cfg, tmp_path, capsys) -> str:
    """main() (what train.py runs) on `cfg`: exit code 2, one error paragraph, no traceback, no step trained."""
    with pytest.raises(SystemExit) as e:
        main(cfg, tmp_path, [])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    assert not list((tmp_path / "checkpoints").glob("step-*.pt")) and not (tmp_path / "final_metrics.json").exists()
    return " ".join(err.split())  # the message as one line, whatever the console wrapped


# -- the loss: one value per sample ---------------------------------------------------------------------------
@pytest.mark.parametrize("loader", [False, True], ids=["on_device", "dataloader"])
@pytest.mark.parametrize("accum", [1, 2])
def test_a_batch_mean_loss_is_refused_on_both_paths_with_grad_accum(tmp_path, capsys, loader, accum):
    micro = 8 // accum
    err = exits_2(fit_cfg(f"trainer.grad_accum={accum}", form="mean", loader=loader), tmp_path, capsys)
    assert f"{__name__}.Fit.loss returned a scalar for a micro-batch of {micro} samples" in err
    assert f"task.batch_size=8 / trainer.grad_accum={accum}" in err if accum > 1 else "task.batch_size=8)" in err
    assert f'core/task.py: loss returns "{CONTRACT}' in err
    assert f"1/{micro} of the gradient" in err and "per_sample.mean()" in err


@pytest.mark.parametrize(("form", "shape"), [("short", "a tensor of shape [7]"), ("column", "a tensor of shape [8, 1]"),
                                             ("float", "a float")])
def test_a_loss_of_the_wrong_shape_or_type_is_refused(tmp_path, capsys, form, shape):
    err = exits_2(fit_cfg(form=form), tmp_path, capsys)
    assert f"Fit.loss returned {shape} for a micro-batch of 8 samples" in err and CONTRACT in err


@pytest.mark.parametrize("loader", [False, True], ids=["on_device", "dataloader"])
def test_a_per_sample_loss_trains(tmp_path, loader):
    final = run(fit_cfg("trainer.grad_accum=2", loader=loader), tmp_path)
    assert final["step"] == 16 and final["mse"] < 1e-3


# -- evaluate(): a dict of names to numbers, checked before training --------------------------------------------
@pytest.mark.parametrize(("result", "said"), [
    (torch.tensor(0.5), "evaluate() returned a Tensor, not a dict"),
    ("0.5", "evaluate() returned a str, not a dict"),
    ({"mse": "low"}, "evaluate()['mse'] is a str ('low')"),
    ({"mse": torch.ones(2)}, "evaluate()['mse'] is a tensor of shape [2]"),
    ({1: 0.5}, "evaluate() has the key 1 (int, not str)"),
])
def test_an_evaluate_result_that_is_not_metrics_is_refused_before_the_first_step(tmp_path, capsys, monkeypatch,
                                                                                  result, said):
    monkeypatch.setattr(Fit, "evaluate", lambda self, model: result)
    err = exits_2(fit_cfg("trainer.max_steps=200"), tmp_path, capsys)  # the only evaluation is the final one
    assert f"the task {__name__}.Fit breaks the task protocol: {said}" in err
    assert "evaluate(model) returns {name: number} (Python floats or 0-d tensors)" in err
    assert not (tmp_path / "metrics.jsonl").exists() or "train/loss" not in (tmp_path / "metrics.jsonl").read_text()


def test_0_d_tensor_metrics_are_taken_as_floats(tmp_path, monkeypatch):
    monkeypatch.setattr(Fit, "evaluate", lambda self, model: {"mse": (model(self.x) - self.y).pow(2).mean()})
    final = run(fit_cfg(), tmp_path)
    assert isinstance(final["mse"], float) and final["mse"] < 1e-3
    assert json.loads((tmp_path / "final_metrics.json").read_text())["mse"] == final["mse"]


@pytest.mark.parametrize(("value", "said"), [(None, "has no batch_size"), (0, "has batch_size=0"),
                                             ("8", "has batch_size='8'")])
def test_a_task_without_a_usable_batch_size_is_refused(tmp_path, capsys, monkeypatch, value, said):
    original = Fit.__init__

    def init(self, **kwargs):
        original(self, **kwargs)
        if value is None:
            del self.batch_size
        else:
            self.batch_size = value

    monkeypatch.setattr(Fit, "__init__", init)
    err = exits_2(fit_cfg(), tmp_path, capsys)
    assert f"the task {__name__}.Fit breaks the task protocol: it {said}" in err
    assert "batch_size: the global batch size" in err and "an int >= 1" in err


def test_an_unknown_sampling_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Fit, "sampling", "shuffle", raising=False)
    err = exits_2(fit_cfg(), tmp_path, capsys)
    assert "Fit breaks the task protocol: sampling='shuffle'; use 'epoch' or 'random'" in err


# -- monitored metrics the task never reports -------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "keys"), [
    ((), ["monitor.metric='val_acc'"]),
    (("early_stop=on",), ["monitor.metric='val_acc'", "early_stop.monitor='val_acc' (from ${monitor.metric})"]),
    (("schedule=plateau",), ["monitor.metric='val_acc'", "schedule.monitor='val_acc' (from ${monitor.metric})"]),
])
def test_a_monitored_metric_the_task_does_not_report_is_refused_before_training(tmp_path, capsys, overrides, keys):
    err = exits_2(fit_cfg("trainer.max_steps=200", "trainer.eval_interval=50", "monitor.metric=val_acc",
                          "monitor.mode=max", *overrides), tmp_path, capsys)
    for key in keys:
        assert f"{key}: the task {__name__}.Fit does not report it; its evaluate() reports mse" in err
    assert "set monitor.metric=mse (the task's YAML or the command line)" in err


def test_a_monitored_metric_of_final_metrics_is_checked_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(Fit, "final_metrics", lambda self, model: {"test_mse": 0.0}, raising=False)
    final = run(fit_cfg("monitor.metric=test_mse"), tmp_path)
    assert final["test_mse"] == 0.0
    with pytest.raises(TaskError, match=r"monitor.metric='test_acc': the task .*Fit does not report it; its "
                                         r"evaluate\(\) reports mse and final_metrics\(\) test_mse"):
        run(fit_cfg("monitor.metric=test_acc"), tmp_path / "other")
    assert not (tmp_path / "other" / "final_metrics.json").exists()


# -- BatchNorm with micro-batches --------------------------------------------------------------------------------
def test_grad_accum_with_batchnorm_warns_once_at_start(tmp_path, capsys):
    run(fit_cfg("trainer.grad_accum=2", batchnorm=True), tmp_path / "accum")
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("warning:") == 1, err
    assert ("trainer.grad_accum=2 with BatchNorm layers (1: BatchNorm1d): each micro-batch of 4 samples is normalised "
            "with its own statistics, so the accumulated gradient is not the 8-sample batch's") in err
    run(fit_cfg(batchnorm=True), tmp_path / "plain")
    run(fit_cfg("trainer.grad_accum=2"), tmp_path / "no_bn")
    assert "warning:" not in capsys.readouterr().err


def test_ddp_ranks_with_batchnorm_are_warned_about_too():
    from core.protocol import batchnorm_warning

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    said = batchnorm_warning(model, batch_size=64, grad_accum=1, world=4)
    assert said.startswith("4 DDP ranks with BatchNorm layers (1: BatchNorm2d): each micro-batch of 16 samples")
    assert batchnorm_warning(model, 64, 1, 1) is None and batchnorm_warning(nn.Linear(1, 1), 64, 4, 2) is None


# -- DDP with one rank is the single process -------------------------------------------------------------------
def test_one_rank_ddp_equals_the_single_process_bit_for_bit(tmp_path, monkeypatch):
    """Fit(noise=0.3) draws input noise in loss(): the training RNG stream must be the single process's on rank 0."""
    from tests.test_faults import free_port
    from tests.test_loop import params

    overrides = ("trainer.max_steps=8", "trainer.checkpoint_interval=0", "trainer.device=cpu")
    single = run(fit_cfg(*overrides, noise=0.3), tmp_path / "single")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    ddp = run(fit_cfg(*overrides, "trainer.strategy=ddp", noise=0.3), tmp_path / "ddp")
    assert ddp["mse"] == single["mse"]
    a, b = params(tmp_path / "single"), params(tmp_path / "ddp")
    assert all(torch.equal(a[k], b[k]) for k in a), (a, b)


def test_ranks_above_0_get_their_own_streams():
    from core.rng import rank_seed

    assert rank_seed(7, 0) is None  # rank 0 is not reseeded: it draws what a single process draws
    seeds = {rank_seed(seed, rank) for seed in range(8) for rank in range(1, 8)}
    assert len(seeds) == 56 and not seeds & set(range(64))  # not seed + rank: no stream of another run's rank 0
