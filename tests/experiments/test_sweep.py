"""Sweeps through the real CLI (Hydra multirun): a failed job is isolated and reported, the end-of-sweep table /
summary files / TensorBoard hparams hold the real final metrics, a re-run skips what finished (the ledger), the
presets compose, and the Optuna sweeper runs with the joblib launcher."""

from __future__ import annotations

import csv
import json
import multiprocessing
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import experiments.sweep  # noqa: F401  (registers ${kiln.direction:...})
from experiments.sweep import Ledger, collect, key_hash
from tests.conftest import ROOT, run_cli

TINY = ("trainer.max_steps=2", "trainer.pictures=false", "trainer.eval_interval=0", "trainer.log_interval=1",
        "trainer.histogram_interval=0")


def _hparams(run_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


def test_failed_job_is_reported_and_a_rerun_skips_the_finished(mnist_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ("-m", "optimizer=sgd", "optimizer.lr=0.01,0.03,0.02,-1", f"data.root={mnist_root}", *TINY,
            f"hydra.sweep.dir={sweep_dir}")
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr  # one failed job does not stop (or fail) the sweep

    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["counts"] == {"finished": 3, "failed": 1, "interrupted": 0}
    assert summary["monitor"] == {"metric": "val_loss", "mode": "min"} and summary["swept"] == ["optimizer.lr"]
    runs = summary["runs"]
    finished, failed = runs[:3], runs[3]
    losses = [r["final/val_loss"] for r in finished]
    assert losses == sorted(losses) and all(r["status"] == "finished" and r["step"] == 2 for r in finished)
    assert failed["status"] == "failed" and failed["params"] == {"optimizer.lr": "-1"}
    assert "ConfigError" in failed["error"] and "-1" in failed["error"]
    # The numbers are the runs' own: final_metrics.json of each job directory.
    for r in finished:
        final = json.loads((sweep_dir / r["run_dir"] / "final_metrics.json").read_text())
        assert r["final/val_loss"] == final["val_loss"] == r["best/val_loss"]
    status = json.loads((sweep_dir / failed["run_dir"] / "status.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 2
    # The printed table, the CSV and TensorBoard's hparams view.
    assert "3 finished, 1 failed" in out.stdout and "failed" in out.stdout and "val_loss (min)" in out.stdout
    with open(sweep_dir / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:4] == ["run_dir", "optimizer.lr", "status", "final/val_loss"]
    assert [(r["run_dir"], r["status"]) for r in table] == [(r["run_dir"], r["status"]) for r in runs]
    assert [float(r["final/val_loss"]) for r in table[:3]] == losses
    for r in finished:
        tb = _hparams(sweep_dir / "hparams" / r["run_dir"])
        assert tb["hparam/final/val_loss"] == pytest.approx(r["final/val_loss"], rel=1e-6)
    assert not (sweep_dir / "hparams" / failed["run_dir"]).exists()

    # Re-running the same sweep into the same directory trains nothing that finished; the failed job tries again.
    stamps = {r["run_dir"]: (sweep_dir / r["run_dir"] / "final_metrics.json").stat().st_mtime_ns for r in finished}
    ledger_before = (sweep_dir / "ledger.jsonl").read_text().splitlines()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped:") == 3
    assert stamps == {d: (sweep_dir / d / "final_metrics.json").stat().st_mtime_ns for d in stamps}
    new = [json.loads(line) for line in (sweep_dir / "ledger.jsonl").read_text().splitlines()[len(ledger_before):]]
    assert [(e["status"], e["run_dir"]) for e in new] == [("failed", failed["run_dir"])]
    assert json.loads((sweep_dir / "summary.json").read_text())["runs"] == runs[:3] + [
        {**failed, "time_s": new[0]["time_s"]}]


def _compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "sweep").glob("*.yaml")))
def test_every_sweep_preset_composes(preset):
    cfg = _compose_with_hydra(f"sweep={preset}")
    hydra_cfg = cfg.hydra
    assert hydra_cfg.sweeper.params or "launcher" in (ROOT / "conf" / "sweep" / f"{preset}.yaml").read_text()


def test_presets_combine_and_pick_their_plugins():
    cfg = _compose_with_hydra("sweep=[vae_optimizers,slurm]")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.sweeper.params.optimizer == "glob(*)"
    cfg = _compose_with_hydra("sweep=[lr_grid,joblib]")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


@pytest.mark.parametrize(("task", "direction"), [("mnist_vae", "minimize"), ("mnist_cnn", "maximize")])
def test_optuna_direction_follows_the_task_monitor(task, direction):
    cfg = _compose_with_hydra("sweep=optuna_lr_wd", f"task={task}")
    assert OmegaConf.select(cfg, "hydra.sweeper.direction") == direction


@pytest.mark.slow
def test_optuna_sweeper_with_the_joblib_launcher(mnist_root, tmp_path):
    """Two Optuna trials run in parallel by joblib; the sweeper sees the real monitored metric."""
    sweep_dir = tmp_path / "optuna"
    out = run_cli("-m", "sweep=[optuna_lr_wd,joblib]", "optimizer=sgd", "hydra.sweeper.n_trials=2",
                  "hydra.sweeper.n_jobs=2", f"data.root={mnist_root}", *TINY, f"hydra.sweep.dir={sweep_dir}")
    assert out.returncode == 0, out.stderr
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["counts"]["finished"] == 2
    assert set(summary["swept"]) == {"optimizer.lr", "regularize.weight_decay"}
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == summary["runs"][0]["final/val_loss"]
    assert float(summary["runs"][0]["params"]["optimizer.lr"]) == best["best_params"]["optimizer.lr"]


def test_an_optuna_sweep_whose_every_trial_fails_prints_the_table_and_a_clear_error(tmp_path):
    """Not Optuna's `ValueError: No trials are completed yet` and no table: each trial's error, a message, exit 1."""
    sweep_dir = tmp_path / "optuna"
    conf = Path(__file__).resolve().parent / "conf"
    out = run_cli("-m", "sweep=optuna_lr_wd", "hydra.sweeper.n_trials=2", f"hydra.searchpath=[file://{conf}]",
                  "task=compare_toy", "trainer.max_steps=2", "trainer.grad_accum=3", "trainer.progress=off",
                  f"hydra.sweep.dir={sweep_dir}", env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "No trials are completed" not in out.stderr, out.stderr
    assert "every one of the 2 trials of the Optuna study failed" in " ".join(out.stderr.split())
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["counts"] == {"finished": 0, "failed": 2, "interrupted": 0}
    assert all("trainer.grad_accum=3: must divide task.batch_size=16" in r["error"] for r in summary["runs"])
    assert "2 runs, 2 failed" in out.stdout


def _summary_rows(sweep_dir: Path) -> dict[str, dict]:
    """summary.json's rows by their optimizer override."""
    runs = json.loads((sweep_dir / "summary.json").read_text())["runs"]
    return {dict(o.split("=", 1) for o in r["overrides"])["optimizer"]: r for r in runs}


def test_two_sweeps_into_one_directory_keep_both_results(mnist_root, tmp_path):
    """Issue 11 item 1: `-m optimizer=adam,sgd` then `-m optimizer=lion,sgd` into one sweep directory. Before the fix,
    lion took job directory 0, adam's files moved to 0/previous_attempt_1 and adam's ledger line still pointed at 0:
    the table showed lion's result as adam's and a re-run "skipped" adam with lion's metric."""
    sweep_dir = tmp_path / "sweep"
    common = (f"data.root={mnist_root}", *TINY, f"hydra.sweep.dir={sweep_dir}")
    first = run_cli("-m", "optimizer=adam,sgd", *common)
    assert first.returncode == 0, first.stderr
    before = _summary_rows(sweep_dir)
    second = run_cli("-m", "optimizer=lion,sgd", *common)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("skipped:") == 1  # sgd, the same job, finished in the first sweep

    rows = _summary_rows(sweep_dir)
    assert sorted(rows) == ["adam", "lion", "sgd"] and len({r["run_dir"] for r in rows.values()}) == 3
    target = {"adam": "torch.optim.Adam", "lion": "optim.lion.Lion", "sgd": "torch.optim.SGD"}
    for name, row in rows.items():  # every row's numbers and config come from that job's own directory
        run_dir = sweep_dir / row["run_dir"]
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["_target_"] == target[name]
        assert f"optimizer={name}" in json.loads((run_dir / "status.json").read_text())["overrides"]
        assert row["final/test_loss"] == json.loads((run_dir / "final_metrics.json").read_text())["test_loss"]
    assert rows["adam"]["final/test_loss"] == before["adam"]["final/test_loss"]
    assert rows["adam"]["final/test_loss"] != rows["lion"]["final/test_loss"]

    # The first sweep again: both of its jobs finished, so nothing trains and adam keeps its own result.
    stamps = {n: (sweep_dir / r["run_dir"] / "final_metrics.json").stat().st_mtime_ns for n, r in rows.items()}
    again = run_cli("-m", "optimizer=adam,sgd", *common)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped:") == 2
    assert stamps == {n: (sweep_dir / r["run_dir"] / "final_metrics.json").stat().st_mtime_ns
                      for n, r in rows.items()}
    assert _summary_rows(sweep_dir)["adam"]["final/test_loss"] == before["adam"]["final/test_loss"]


def _claim_many(sweep_dir: Path, worker: int, n: int, queue, barrier) -> None:
    ledger = Ledger(sweep_dir)
    got = {}
    for i in range(n):  # every worker asks for the same first choice ("0", "1", ...) at the same moment
        key = f"job {i} of worker {worker} #{worker:016x}"
        barrier.wait(timeout=60)
        got[key] = ledger.claim(key, [], [str(i), f"{i}-{key_hash(key)}"])
        ledger.append({"key": key, "status": "finished", "overrides": [], "run_dir": got[key], "final": {}})
    queue.put(got)


def test_parallel_processes_never_give_one_directory_to_two_jobs(tmp_path):
    """Six processes claim directories in one ledger at once (two sweeps, or joblib/SLURM jobs, sharing a sweep
    directory): every key gets a directory of its own and every line of the ledger stays whole."""
    ctx = multiprocessing.get_context("fork")
    queue, barrier = ctx.Queue(), ctx.Barrier(6)
    procs = [ctx.Process(target=_claim_many, args=(tmp_path, w, 25, queue, barrier)) for w in range(6)]
    for proc in procs:
        proc.start()
    claims = {k: v for _ in procs for k, v in queue.get(timeout=120).items()}
    for proc in procs:
        proc.join(timeout=60)
    assert len(claims) == 150 and None not in claims.values()
    assert len(set(claims.values())) == 150
    raw = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert len(raw) == 300 and all(json.loads(line)["key"] in claims for line in raw)
    assert Ledger(tmp_path).dirs() == claims


def test_a_finished_result_is_trusted_only_in_its_own_directory(tmp_path):
    """A ledger written by the old code after two sweeps into one directory: adam and lion both name directory 0,
    which now holds lion's run. Neither result may be reported as adam's; adam runs again."""
    run_dir = tmp_path / "0"
    run_dir.mkdir()
    (run_dir / "final_metrics.json").write_text(json.dumps({"step": 2, "test_loss": 546.1}))
    (run_dir / "status.json").write_text(json.dumps({"status": "finished", "key": "optimizer=lion #2"}))
    old = [("optimizer=adam #1", "optimizer=adam", 511.3), ("optimizer=lion #2", "optimizer=lion", 546.1)]
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(
        {"key": k, "status": "finished", "overrides": [o], "run_dir": "0", "final": {"test_loss": v}}) + "\n"
        for k, o, v in old))
    ledger = Ledger(tmp_path)
    assert ledger.finished("optimizer=adam #1") is None
    rows = {r["overrides"][0]: r for r in collect(tmp_path, "test_loss", "min")}
    assert rows["optimizer=adam"]["final/test_loss"] is None and rows["optimizer=adam"]["status"] == "failed"
    assert ledger.claim("optimizer=sgd #3", [], ["0", "0-x"]) == "0-x"  # 0 has an owner: never a third key's
