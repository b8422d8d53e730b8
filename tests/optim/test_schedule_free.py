"""Schedule-free SGD and AdamW (the authors' package `schedulefree`, conf/optimizer/sf_*.yaml) driven by the trainer,
against Algorithm 1 of Defazio et al. 2024 ("The Road Less Scheduled", arXiv 2405.15682) computed by hand in
float64: the trainer trains at y and evaluates, snapshots, draws and saves x (optim/schedule_free.py), and evaluating
never changes training; BatchNorm statistics are recomputed for x; a resumed run (sf_radam too) equals the
uninterrupted one bit for bit; a decaying schedule is a warning; compare takes the options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from config.rules import oddities
from core.sampler import EpochSampler
from core.task import Task
from schedules import Horizon, constant, cosine_warmup, plateau, sgdr, warmup_exp, warmup_linear, wsd
from schedules.functions import decays
from tests.conftest import compose_cfg
from tests.experiments.test_compare import TOY, run_main
from tests.test_batches import digits_cfg
from tests.test_loop import line_cfg, logged, params
from tests.test_resume import interrupt_at, straight_then_resumed, toy
from tests.toy import LineTask
from trainer.checkpoint import load_checkpoint
from trainer.run import run
from trainer.signals import Interrupted

TARGET, SWEET = 10.0, 3.0  # LineTask: per-sample loss (w - 10)^2, evaluation |w - 3|


def algorithm_1(T, lr, beta, wd, warmup, adam=None):
    """Algorithm 1 of the paper on f(w) = (w - 10)^2 from w = 0, in float64: (y_t, x_{t+1}, z_{t+1}) for t = 1..T.
    gamma_t = lr * min(1, t / warmup); c_{t+1} = gamma_t^2 / sum_{i<=t} gamma_i^2; weight decay at y.
    adam=(beta2, eps): the AdamW form, z -= gamma_t * (g / (sqrt(v_t / (1 - beta2^t)) + eps) + wd * y)."""
    x = z = v = weights = 0.0
    out = []
    for t in range(1, T + 1):
        y = (1 - beta) * z + beta * x
        g = 2 * (y - TARGET)
        gamma = lr * min(1.0, t / warmup) if warmup else lr
        if adam:
            beta2, eps = adam
            v = beta2 * v + (1 - beta2) * g * g
            z -= gamma * (g / (math.sqrt(v / (1 - beta2**t)) + eps) + wd * y)
        else:
            z -= gamma * (g + wd * y)
        weights += gamma**2
        c = gamma**2 / weights
        x = (1 - c) * x + c * z
        out.append((y, x, z))
    return out


class SeenLine(LineTask):
    """LineTask that records the weight its evaluation, pictures and final pictures see."""

    seen: list[tuple[str, int | None, float]] = []

    def evaluate(self, model):
        SeenLine.seen.append(("evaluate", None, model.w.item()))
        return super().evaluate(model)

    def pictures(self, model, writer, step):
        SeenLine.seen.append(("pictures", step, model.w.item()))

    def save_pictures(self, model, folder):
        SeenLine.seen.append(("save_pictures", None, model.w.item()))


def line(*overrides):
    cfg = toy("schedule=constant", "regularize.weight_decay=0.1", "trainer.eval_interval=1", *overrides)
    cfg.task._target_ = "tests.optim.test_schedule_free.SeenLine"
    return cfg


@pytest.mark.parametrize(("option", "lr", "adam"), [("sf_sgd", 0.05, None), ("sf_adamw", 0.5, (0.999, 1e-8))])
def test_the_trainer_trains_at_y_and_evaluates_draws_and_saves_x(tmp_path, option, lr, adam):
    T, W = 6, 3
    ref = algorithm_1(T, lr, 0.9, 0.1, W, adam)
    SeenLine.seen = []
    final = run(line(f"optimizer={option}", f"optimizer.lr={lr}", f"optimizer.warmup_steps={W}",
                     f"trainer.max_steps={T}", "trainer.pictures=true"), tmp_path)
    # training at y: the loss logged at step t is the forward at y_t
    for t, loss in logged(tmp_path).items():
        assert loss == pytest.approx((ref[t - 1][0] - TARGET) ** 2, rel=1e-5), t
    # evaluation (also of the initial weights, x_1 = z_1 = 0, before training), pictures and the final pictures at x
    evaluated = [w for what, _, w in SeenLine.seen if what == "evaluate"]
    assert evaluated == pytest.approx([0.0] + [x for _, x, _ in ref], rel=1e-5)
    assert [(s, w) for what, s, w in SeenLine.seen if what == "pictures"] == \
        [(t, pytest.approx(ref[t - 1][1], rel=1e-5)) for t in range(1, T + 1)]
    assert SeenLine.seen[-1] == ("save_pictures", None, pytest.approx(ref[-1][1], rel=1e-5))
    assert final["distance"] == pytest.approx(abs(ref[-1][1] - SWEET), rel=1e-5)
    # the checkpoint: x in the model, z in the optimizer, which is in eval mode
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["model"]["w"].item() == pytest.approx(ref[-1][1], rel=1e-5)
    assert ckpt["optimizer"]["state"][0]["z"].item() == pytest.approx(ref[-1][2], rel=1e-5)
    assert not ckpt["optimizer"]["param_groups"][0]["train_mode"]


def test_early_stopping_keeps_and_restores_x(tmp_path):
    """The best weights early stopping keeps (best.pt, and the model at the end) are x at the best evaluation."""
    lr, W = 0.05, 1
    ref = algorithm_1(40, lr, 0.9, 0.1, W)
    cfg = line_cfg("optimizer=sf_sgd", f"optimizer.lr={lr}", f"optimizer.warmup_steps={W}", "trainer.max_steps=40",
                   "regularize.weight_decay=0.1")  # early stopping on distance, patience 2
    cfg.task._target_ = "tests.optim.test_schedule_free.SeenLine"
    SeenLine.seen = []
    final = run(cfg, tmp_path)
    best = final["restored_best_step"]
    assert best < final["step"] < 40  # it stopped early, after passing the sweet spot
    assert best == min(range(1, final["step"] + 1), key=lambda t: abs(ref[t - 1][1] - SWEET))
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["model"]["w"].item() == \
        pytest.approx(ref[best - 1][1], rel=1e-5)
    assert final["distance"] == pytest.approx(abs(ref[best - 1][1] - SWEET), rel=1e-5)  # restored, then evaluated
    assert SeenLine.seen[-1][2] == pytest.approx(ref[best - 1][1], rel=1e-5)  # the final pictures: restored x


def test_evaluating_leaves_training_untouched(tmp_path):
    """Evaluating every step (y -> x and back each time) trains exactly as a run that never evaluates: the way back
    restores y, it does not lerp back (which would be off by float32 rounding)."""
    common = ("optimizer=sf_adamw", "optimizer.lr=0.5", "trainer.max_steps=30")
    run(line(*common), tmp_path / "every")
    run(line(*common, "trainer.eval_interval=0"), tmp_path / "never")
    every, never = logged(tmp_path / "every"), logged(tmp_path / "never")
    assert every == never and len(every) == 30
    assert params(tmp_path / "every") == params(tmp_path / "never")  # x at the end, from the same y and z


@pytest.mark.parametrize(("option", "eval_every"), [("sf_adamw", 10), ("sf_sgd", 15), ("sf_radam", 10)])
def test_resume_is_bit_exact(mnist_root, tmp_path, option, eval_every):
    """30 steps straight == 10 steps, then a resume from the step-10 checkpoint: the checkpoint holds x and the
    optimizer in eval mode, and both runs go from there to y by the same operation (eval_every=15: a checkpoint
    without an evaluation)."""
    common = (f"optimizer={option}", "optimizer.lr=0.01", "schedule=constant", "trainer.max_steps=30",
              "trainer.log_interval=5", "trainer.checkpoint_interval=10", "trainer.keep_checkpoints=0",
              f"trainer.eval_interval={eval_every}")
    straight, resumed = straight_then_resumed(mnist_root, tmp_path, common, at=10)
    losses = logged(resumed)
    assert min(losses) == 15 and {s: logged(straight)[s] for s in losses} == losses
    assert logged(straight, "eval/val_loss")[30] == logged(resumed, "eval/val_loss")[30]


def test_sigterm_and_resume_with_batchnorm_and_a_dataloader_equals_the_straight_run(digit_folder, tmp_path,
                                                                                     monkeypatch):
    """BatchNorm (the small CNN's own), the DataLoader path, random crops, SIGTERM at step 7 between evaluations:
    the statistics recomputed for x at each checkpoint and evaluation are part of both runs alike."""
    common = ("optimizer=sf_adamw", "schedule=constant", "trainer.max_steps=20", "trainer.eval_interval=10",
              "trainer.checkpoint_interval=5", "trainer.log_interval=1", "regularize.dropout=0.2")
    straight = tmp_path / "straight"
    run(digits_cfg(digit_folder, *common), straight)
    run_dir = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        interrupt_at(m, 7)
        with pytest.raises(Interrupted):
            run(digits_cfg(digit_folder, *common), run_dir)
    run(digits_cfg(digit_folder, *common, f"trainer.resume={run_dir}"), run_dir)
    a, b = params(straight), params(run_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert logged(run_dir) == logged(straight)
    assert logged(run_dir, "eval/val_acc") == logged(straight, "eval/val_acc")


def test_a_resume_that_changes_hyperparameters_keeps_the_optimizers_running_entries(tmp_path):
    """trainer.max_steps changed on resume: the new config's hyperparameters apply, but the package's step count,
    weight sum and largest lr (param-group entries) continue; a fresh k = 0 would restart the average."""
    common = ("optimizer=sf_adamw", "optimizer.lr=0.5", "optimizer.warmup_steps=4", "trainer.checkpoint_interval=10",
              "trainer.eval_interval=10")
    final = run(line(*common, "trainer.max_steps=30"), tmp_path / "straight")
    run(line(*common, "trainer.max_steps=10"), tmp_path / "first")
    resumed = run(line(*common, "trainer.max_steps=30", f"trainer.resume={tmp_path / 'first'}"), tmp_path / "more")
    assert params(tmp_path / "more")["w"].item() == params(tmp_path / "straight")["w"].item()
    assert resumed["distance"] == final["distance"]
    assert load_checkpoint(tmp_path / "more" / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]["k"] == 30


class BNRegression(Task):
    """y = a.x on 2-D inputs through Linear(2, 4) -> BatchNorm1d(4) -> Linear(4, 1), data on the device."""

    sampling, check_evaluate_first = "epoch", False

    def __init__(self, batch_size: int = 8, size: int = 64) -> None:
        self.batch_size, self.size = batch_size, size

    def setup(self, device):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.size, 2, generator=g) * torch.tensor([3.0, 0.5]) + torch.tensor([1.0, -2.0])
        self.y = self.x @ torch.tensor([[1.5], [-0.5]])

    def build_model(self):
        return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))

    @property
    def train_size(self):
        return self.size

    def train_batch(self, indices):
        return self.x[indices], self.y[indices]

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).squeeze(1)

    def evaluate(self, model):
        return {"mse": ((model(self.x) - self.y) ** 2).mean().item()}


@pytest.mark.parametrize("option", ["sf_adamw", "adamw"])
def test_batchnorm_statistics_are_those_of_x_on_the_last_steps_batches(tmp_path, option):
    """The authors' README: the running statistics were gathered at y; before evaluating x, forward training batches
    at x. Reference: the mean and (unbiased) variance of x's first-layer outputs over the training batches of the
    last min(50, step) steps, averaged over the batches. An optimizer without modes leaves the statistics alone."""
    T, batch = 12, 8
    cfg = compose_cfg(f"optimizer={option}", "optimizer.lr=0.05", "schedule=constant", f"trainer.max_steps={T}",
                      "trainer.eval_interval=0", "trainer.progress=off", "trainer.histogram_interval=0",
                      "trainer.pictures=false", "monitor.metric=mse", "monitor.mode=min")
    cfg.task = {"_target_": "tests.optim.test_schedule_free.BNRegression", "batch_size": batch}
    run(cfg, tmp_path)
    state = params(tmp_path)
    task = BNRegression(batch)
    task.setup(torch.device("cpu"))
    sampler = EpochSampler(task.size, batch, cfg.trainer.seed, torch.device("cpu"))
    hs = [task.x[sampler.indices(s)] @ state["0.weight"].T + state["0.bias"] for s in range(T)]
    mean = torch.stack([h.mean(0) for h in hs]).mean(0)
    var = torch.stack([h.var(0) for h in hs]).mean(0)
    recomputed = torch.allclose(state["1.running_mean"], mean, atol=1e-5) and \
        torch.allclose(state["1.running_var"], var, rtol=1e-4)
    assert recomputed == (option == "sf_adamw")


def test_decaying_schedules_are_told_apart_from_warmup_and_constant():
    h = Horizon(1000, 100)
    assert not any(decays(f, 1000) for f in (constant(h), warmup_linear(h), warmup_exp(h)))
    assert all(decays(f, 1000) for f in (cosine_warmup(h), wsd(h), sgdr(h, decay=1.0), plateau(h)))


def test_a_schedule_free_optimizer_under_a_decaying_schedule_is_a_warning():
    warned = lambda *o: [w for w in oddities(compose_cfg(*o)) if "schedule-free" in w]  # noqa: E731
    (line_,) = warned("optimizer=sf_adamw")  # kiln's default schedule is cosine_warmup
    assert line_.startswith("schedule._target_=schedules.cosine_warmup") and "schedule=constant" in line_
    assert warned("optimizer=sf_sgd", "schedule=plateau")
    assert not warned("optimizer=sf_sgd", "schedule=constant") and not warned("optimizer=sf_radam",
                                                                              "schedule=warmup_linear")
    assert not warned("optimizer=adamw")


def test_compare_takes_a_schedule_free_option(tmp_path):
    result = run_main(["optimizer=adamw,sf_adamw", *TOY, "schedule=warmup_linear", "trainer.max_steps=12",
                       "--screen", "--seeds", "1", "--out", str(tmp_path)])
    assert result.code == 0, result.err
    assert "sf_adamw" in (tmp_path / "report.md").read_text()


def test_kilns_warmup_linear_is_the_packages_warmup_steps(tmp_path):
    """The YAMLs offer either warmup: schedule=warmup_linear sets the lr the package's warmup_steps would compute,
    base * (t+1)/W, so the runs agree bit for bit."""
    common = ("optimizer=sf_adamw", "optimizer.lr=0.5", "trainer.max_steps=12")
    run(line(*common, "optimizer.warmup_steps=5"), tmp_path / "package")
    run(line(*common, "schedule=warmup_linear", "schedule.warmup=5"), tmp_path / "kiln")
    assert logged(tmp_path / "package") == logged(tmp_path / "kiln")
    assert params(tmp_path / "package") == params(tmp_path / "kiln")


def test_lookahead_around_a_schedule_free_optimizer_is_a_config_error():
    from config import problems

    lines = problems(compose_cfg("optimizer=lookahead", "optimizer@optimizer.inner=sf_adamw", "schedule=constant"))
    assert any(line.startswith("optimizer.inner._target_: AdamWScheduleFree is schedule-free") for line in lines), lines


def test_with_weight_averaging_the_raw_metrics_are_x_and_training_stays_at_y(tmp_path):
    """average=ema with a schedule-free optimizer: the raw_ evaluation sees x (Algorithm 1's), the averaged one the
    average of the trained weights, and training at y is untouched by either."""
    T, lr, W = 6, 0.05, 3
    ref = algorithm_1(T, lr, 0.9, 0.1, W)
    SeenLine.seen = []
    final = run(line("optimizer=sf_sgd", f"optimizer.lr={lr}", f"optimizer.warmup_steps={W}", f"trainer.max_steps={T}",
                     "average=ema", "average.eval=both"), tmp_path)
    for t, loss in logged(tmp_path).items():
        assert loss == pytest.approx((ref[t - 1][0] - TARGET) ** 2, rel=1e-5), t
    evaluated = [w for what, _, w in SeenLine.seen if what == "evaluate"]
    raw, averaged = evaluated[1::2], evaluated[2::2]  # after the check of the initial weights: raw, then the average
    assert raw == pytest.approx([x for _, x, _ in ref], rel=1e-5)
    assert all(a != pytest.approx(x, rel=1e-5) for a, (_, x, _) in zip(averaged[1:], ref[1:]))
    assert final["raw_distance"] == pytest.approx(abs(ref[-1][1] - SWEET), rel=1e-5)
