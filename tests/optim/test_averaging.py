"""Weight averaging (optim/averaging.py) against references written from the sources: timm's ModelEmaV3 decay
(its formula, expanded as a closed-form sum), the half-life's definition, SWA's equal mean of the snapshots, LAWA's
mean of the last k; BatchNorm statistics recomputed from the data on both data paths, RNG untouched."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from core.batches import DataLoading, make_batches
from core.sampler import EpochSampler
from core.task import Task
from optim.averaging import EMA, LAWA, SWA
from schedules import Horizon
from trainer.distributed import Dist

H = Horizon(total_steps=100, steps_per_epoch=10)


def weights(t: int) -> torch.Tensor:
    """The trained weight after step t: an arbitrary, non-monotone trajectory."""
    return torch.tensor([[math.sin(t) + 0.1 * t, (-1.0) ** t * t]])


def trained(average, steps):
    """Feed the trajectory weights(1..steps) through average.update; returns the averaged weight tensor."""
    model = nn.Linear(2, 1, bias=False)
    for t in range(1, steps + 1):
        with torch.no_grad():
            model.weight.copy_(weights(t))
        average.update(model, t)
    return (average.averaged() or [None])[0]


def timm_decay(t: int, start=0, decay=0.999, gamma=1.0, power=0.75, min_decay=0.0) -> float:
    """timm/utils/model_ema.py, ModelEmaV3.get_decay with use_warmup=True, update_after_step=start."""
    t = max(0, t - start - 1)
    if t <= 0:
        return 0.0
    return max(min(1 - (1 + t / gamma) ** -power, decay), min_decay)


def test_ema_decay_is_timms_warmup():
    ema = EMA(nn.Linear(2, 1), H, decay=0.9, warmup_power=0.75)
    # 1 - 2^-0.75 = 0.40539..., 1 - 10^-0.75 = 0.82217...; capped at decay = 0.9 once 1 - (1+t)^-0.75 passes it
    assert ema.decay_at(1) == 0.0 and ema.decay_at(2) == pytest.approx(0.405396, abs=1e-6)
    assert ema.decay_at(10) == pytest.approx(0.822172, abs=1e-6)  # t = 10 - 0 - 1 = 9
    assert ema.decay_at(1000) == 0.9
    assert EMA(nn.Linear(2, 1), H, warmup=False, decay=0.9).decay_at(2) == 0.9


@pytest.mark.parametrize("start", [0, 3])
def test_ema_with_warmup_equals_the_closed_form(start):
    """a_T = sum_t (1 - d_t) prod_{s > t} d_s w_t over the updates t = start..T (the first has d = 0: a copy)."""
    steps = 12
    got = trained(EMA(nn.Linear(2, 1, bias=False), H, decay=0.8, start=start), steps)
    ds = {t: timm_decay(t, start, decay=0.8) for t in range(start, steps + 1)}
    want = sum((1 - ds[t]) * math.prod(ds[s] for s in range(t + 1, steps + 1)) * weights(t).double()
               for t in range(max(start, 1), steps + 1))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_ema_half_life_in_epochs():
    """A half-life of 2 epochs (20 steps): a weight's share halves every 20 updates."""
    ema = EMA(nn.Linear(1, 1, bias=False), H, half_life="2ep", warmup=False)
    assert ema.decay ** 20 == pytest.approx(0.5, rel=1e-12)
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update(model, 1)  # the copy: a = 0
    with torch.no_grad():
        model.weight.fill_(1.0)
    for t in range(2, 22):
        ema.update(model, t)
    assert ema.averaged()[0].item() == pytest.approx(0.5, rel=1e-5)


def test_swa_is_the_mean_of_its_snapshots():
    got = trained(SWA(nn.Linear(2, 1, bias=False), H, start=3, every=2), 12)  # snapshots after steps 3, 5, 7, 9, 11
    want = torch.stack([weights(t) for t in (3, 5, 7, 9, 11)]).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_swa_before_its_start_has_no_average():
    swa = SWA(nn.Linear(2, 1, bias=False), H)  # start 0.75 of 100 steps, every epoch (10 steps)
    assert trained(swa, 74) is None
    assert torch.equal(trained(SWA(nn.Linear(2, 1, bias=False), H), 75), weights(75))


@pytest.mark.parametrize("steps", [4, 12, 13])
def test_lawa_is_the_mean_of_the_last_k_snapshots(steps):
    lawa = LAWA(nn.Linear(2, 1, bias=False), H, k=3, every=2, start=2)  # snapshots after steps 2, 4, 6, ...
    got = trained(lawa, steps)
    taken = list(range(2, steps + 1, 2))[-3:]
    torch.testing.assert_close(got, torch.stack([weights(t) for t in taken]).mean(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [lambda m: EMA(m, H, decay=0.7), lambda m: SWA(m, H, start=2, every=1),
                                  lambda m: LAWA(m, H, k=2, every=1)])
def test_state_dict_round_trip_continues_exactly(make):
    a = make(nn.Linear(2, 1, bias=False))
    trained(a, 6)
    b = make(nn.Linear(2, 1, bias=False))
    b.load_state_dict(a.state_dict())
    model = nn.Linear(2, 1, bias=False)
    for t in range(7, 10):
        with torch.no_grad():
            model.weight.copy_(weights(t))
        a.update(model, t)
        b.update(model, t)
    assert torch.equal(a.averaged()[0], b.averaged()[0])


def test_the_average_is_float32_under_autocast():
    model = nn.Linear(2, 1)
    ema = EMA(model, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ema.update(model, 1)
    assert all(t.dtype == torch.float32 for t in ema.averaged())


@pytest.mark.parametrize("bad, key", [(dict(decay=1.5), "average.decay=1.5"), (dict(bn="both"), "average.bn"),
                                      (dict(eval="raw"), "average.eval"), (dict(half_life=0), "average.half_life")])
def test_bad_settings_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        EMA(nn.Linear(2, 1), H, **bad)


# -- BatchNorm statistics of the average, recomputed on both data paths ----------------------------------------
class Run:
    """What Average.apply takes from the run (trainer/build.py's Parts)."""

    def __init__(self, task, model, batches, dist=None):
        self.task, self.model, self.batches, self.dist = task, model, batches, dist or Dist()
        self.autocast, self.device = contextlib.nullcontext(), torch.device("cpu")


class BNTask(Task):
    """Inputs x in R^3 with a BatchNorm as the model's first layer: its recomputed statistics are the data's."""

    batch_size = 8

    def __init__(self, loader: bool) -> None:
        self.x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 3 + 5
        self.loader = loader

    def setup(self, device):
        pass

    def build_model(self):
        return nn.Sequential(nn.BatchNorm1d(3), nn.Dropout(0.5), nn.Linear(3, 1))

    @property
    def train_size(self):
        return 64

    def train_dataset(self):
        return TensorDataset(self.x) if self.loader else None

    def train_batch(self, indices):
        return (self.x[indices],)

    def loss(self, model, batch):
        return model(batch[0]).squeeze(1)

    def evaluate(self, model):
        return {}


@pytest.mark.parametrize("loader", [False, True], ids=["train_batch", "DataLoader"])
def test_batchnorm_statistics_are_recomputed_from_the_first_steps_batches(loader):
    task = BNTask(loader)
    task.loading = DataLoading(torch.device("cpu"))
    sampler = EpochSampler(64, 8, 0, torch.device("cpu"))
    batches = make_batches(task, sampler, Dist(), 1, 0, 100)
    model = task.build_model()
    swa = SWA(model, H, start=1, every=1, bn="recompute", bn_steps=3)
    for t in (1, 2):
        with torch.no_grad():
            model[2].weight.add_(1.0)
        swa.update(model, t)
    with torch.no_grad():
        model[0].running_mean.fill_(7.0)
    before_w, before_bn = model[2].weight.clone(), model[0].running_mean.clone()
    rng = torch.get_rng_state()
    with swa.swapped(Run(task, model, batches)) as swapped:
        assert swapped
        # update_bn's cumulative average: the mean over the steps 0..2 of each batch's mean (and unbiased variance)
        xs = [task.x[sampler.indices(s)] for s in range(3)]
        torch.testing.assert_close(model[0].running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
        torch.testing.assert_close(model[0].running_var, torch.stack([x.var(0) for x in xs]).mean(0))
        torch.testing.assert_close(model[2].weight, before_w - 0.5)  # the mean of the two snapshots
    assert torch.equal(torch.get_rng_state(), rng)  # dropout in the BatchNorm pass drew from a forked RNG
    assert torch.equal(model[2].weight, before_w) and torch.equal(model[0].running_mean, before_bn)
    batches.close()


# -- through the trainer ---------------------------------------------------------------------------------------
def cnn_cfg(root, *overrides):
    from tests.conftest import compose_cfg

    return compose_cfg("recipe=mnist_cnn", f"data.root={root}", "task.val_size=1000", "task.batch_size=32",
                       "trainer.max_steps=30", "trainer.eval_interval=10", "trainer.log_interval=1",
                       "trainer.checkpoint_interval=10", "trainer.keep_checkpoints=0", "trainer.progress=off",
                       "trainer.pictures=false", "trainer.histogram_interval=0", "early_stop.patience=1000",
                       *overrides)


def logged(run_dir, prefix):
    import json

    return {(r["step"], k.replace("raw_", "")): v for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            for r in [json.loads(line)] for k, v in r.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_averaging_leaves_training_untouched_and_raw_metrics_are_the_plain_runs(mnist_root, tmp_path):
    """The CNN (BatchNorm, dropout) with SWA and its BatchNorm statistics recomputed at every evaluation trains
    exactly as without averaging: the same losses, the same last weights, and its raw_ metrics are the plain run's
    metrics. The averaged metrics differ from them."""
    from trainer.checkpoint import load_checkpoint
    from trainer.run import run

    plain = run(cnn_cfg(mnist_root), tmp_path / "plain")
    swa = run(cnn_cfg(mnist_root, "average=swa", "average.start=5", "average.every=5", "average.bn_steps=3",
                      "average.eval=both"), tmp_path / "swa")
    assert logged(tmp_path / "swa", "train/loss") == logged(tmp_path / "plain", "train/loss")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt")["model"] for d in ("plain", "swa"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged(tmp_path / "swa", "eval/raw_") == logged(tmp_path / "plain", "eval/")
    assert swa["raw_test_acc"] == plain["test_acc"] and swa["raw_val_acc"] == plain["val_acc"]
    assert logged(tmp_path / "swa", "eval/val_loss") != logged(tmp_path / "plain", "eval/val_loss")


@pytest.mark.slow
def test_ema_early_stopping_keeps_and_restores_the_averaged_weights(mnist_root, tmp_path):
    """average=ema on the CNN: best.pt holds the average at the best evaluation (not the trained weights), and the
    final metrics are those of the weights restored from it."""
    from trainer.checkpoint import load_checkpoint
    from trainer.run import run

    final = run(cnn_cfg(mnist_root, "average=ema"), tmp_path)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    at_best = load_checkpoint(tmp_path / "checkpoints" / f"step-{best['step']:08d}.pt")
    average = {k.removeprefix("module."): v for k, v in at_best["average"]["model"].items() if k != "n_averaged"}
    assert all(torch.equal(best["model"][k], average[k]) for k in best["model"])
    assert not all(torch.equal(best["model"][k], at_best["model"][k]) for k in best["model"])
    assert final["restored_best_step"] == best["step"] and final["val_acc"] == best["metrics"]["val_acc"]


# -- DDP (gloo on the CPU): every rank holds the same average --------------------------------------------------
def _rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {}
        for bn in BN_MODES:
            task = BNTask(loader=False)
            task.loading = DataLoading(torch.device("cpu"))
            sampler = EpochSampler(64, 8, 0, torch.device("cpu"))
            torch.manual_seed(0)
            model = task.build_model()  # the same initial weights on every rank
            ema = EMA(model, H, decay=0.5, warmup=False, bn=bn, bn_steps=4)
            for t in (1, 2, 3):
                with torch.no_grad():
                    model[2].weight.add_(t)  # the same update on every rank (DDP's averaged gradient)
                    model[0].running_mean.fill_(10.0 * rank + t)  # BatchNorm's statistics: each rank its shard's
                ema.update(model, t)
            ranks = Dist(rank, world)
            ema.apply(Run(task, model, make_batches(task, sampler, ranks, 1, 0, 100), ranks))
            results[bn] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


BN_MODES = ("average", "recompute")


def test_under_ddp_every_rank_holds_the_same_average(tmp_path):
    """Two gloo ranks, the same weight updates, different BatchNorm statistics (each rank normalises its own shard):
    the applied average is identical on both. Averaged statistics are rank 0's; recomputed ones are the mean over
    both ranks' shards of the same steps, i.e. (equal halves) the mean of each whole step batch's mean."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    for bn in BN_MODES:
        assert all(torch.equal(r0[bn][k], r1[bn][k]) for k in r0[bn]), bn
    # rank 0's running means 1, 2, 3 under decay 0.5: 0.5 * (0.5 * 1 + 0.5 * 2) + 0.5 * 3
    assert torch.equal(r0["average"]["0.running_mean"], torch.full((3,), 2.25))
    task, sampler = BNTask(loader=False), EpochSampler(64, 8, 0, torch.device("cpu"))
    whole = torch.stack([task.x[sampler.indices(s)].mean(0) for s in range(4)]).mean(0)
    torch.testing.assert_close(r0["recompute"]["0.running_mean"], whole)
