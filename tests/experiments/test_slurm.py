"""`sweep=slurm` against a real SLURM cluster (tests marked `slurm`): a 2-job sweep and a 2-task DDP job are
submitted through hydra-submitit-launcher, run by SLURM, and their results read back (the sweep's summary, each
job's final_metrics.json, submitit's result files); requests the cluster cannot meet end with a message naming the
hydra.launcher key, never a traceback. `make slurm-up` (scripts/slurm.sh) starts a single-node cluster on this
machine; without an idle node these tests skip, and fail instead under KILN_REQUIRE_SLURM=1 (.ci/run sets it).
The message logic itself is checked without a cluster, against sbatch's and sinfo's real words."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest

from hydra_plugins.kiln_slurm_launcher import node_limits, refused_message, too_big
from tests.conftest import ROOT, run_cli

TINY = ("trainer.max_steps=2", "trainer.pictures=false", "trainer.eval_interval=0", "trainer.log_interval=1",
        "trainer.histogram_interval=0")


def need_slurm() -> None:
    """A SLURM node that takes jobs (idle, or busy with a job that just ended), or a skip with the reason (a failure
    under KILN_REQUIRE_SLURM=1: CI must not skip)."""
    reason = None
    if shutil.which("sinfo") is None:
        reason = "sinfo not found"
    else:
        try:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            out = subprocess.CompletedProcess([], 1, "", "no answer in 30 s (is slurmctld running?)")
        states = out.stdout.split()
        if out.returncode != 0:
            reason = f"sinfo failed: {(out.stderr.strip().splitlines() or ['no message'])[-1]}"
        elif not {"idle", "mixed", "allocated", "completing"} & set(states):  # "idle*": not responding
            reason = f"no idle node (sinfo: {' '.join(states) or 'no nodes'})"
    if reason:
        message = f"no SLURM cluster up ({reason}): `make slurm-up` starts one on this machine (root, Debian/Ubuntu)"
        if os.environ.get("KILN_REQUIRE_SLURM") == "1":
            pytest.fail(message + "; KILN_REQUIRE_SLURM=1 makes that a failure")
        pytest.skip(message)


def _task_results(sweep_dir) -> dict[str, list[float]]:
    """SLURM job id -> the value each of its tasks returned to the launcher (submitit's <id>_<task>_result.pkl)."""
    out: dict[str, list[float]] = {}
    for path in sorted(sweep_dir.glob(".submitit/*/*_result.pkl")):
        outcome, job_return = pickle.loads(path.read_bytes())
        assert outcome == "success", path
        out.setdefault(path.parent.name, []).append(job_return.return_value)
    return out


@pytest.mark.slurm
def test_two_job_sweep_runs_on_slurm(mnist_root, tmp_path):
    need_slurm()
    sweep_dir = tmp_path / "sweep"
    started = time.time()
    out = run_cli("-m", "sweep=slurm", "optimizer=sgd", "optimizer.lr=0.01,0.02", f"data.root={mnist_root}", *TINY,
                  f"hydra.sweep.dir={sweep_dir}", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["counts"] == {"finished": 2, "failed": 0, "interrupted": 0}
    results = _task_results(sweep_dir)
    print(f"\nslurm sweep: {len(results)} jobs submitted ({len(list(sweep_dir.glob('.submitit/*/*_submission.sh')))} "
          f"sbatch job array), all ended in {time.time() - started:.1f}s")
    assert len(results) == 2 and all(len(v) == 1 for v in results.values())  # two SLURM jobs, one task each
    for run in summary["runs"]:
        final = json.loads((sweep_dir / run["run_dir"] / "final_metrics.json").read_text())
        assert final["step"] == 2 and run["final/val_loss"] == final["val_loss"]
        print(f"slurm sweep: job {run['run_dir']} {run['params']} {run['status']}: val_loss {final['val_loss']:.4f} "
              "(summary.json = final_metrics.json)")
    # What each SLURM job returned to the launcher is the run's own final metric.
    assert sorted(v[0] for v in results.values()) == sorted(r["final/val_loss"] for r in summary["runs"])
    print(f"slurm sweep: results read back from {len(results)} SLURM jobs ({', '.join(sorted(results))})")


@pytest.mark.slurm
def test_ddp_job_with_two_tasks_runs_on_slurm(mnist_root, tmp_path):
    need_slurm()
    sweep_dir = tmp_path / "ddp"
    started = time.time()
    out = run_cli("-m", "sweep=slurm", "trainer.strategy=ddp", "hydra.launcher.tasks_per_node=2",
                  f"data.root={mnist_root}", *TINY, f"hydra.sweep.dir={sweep_dir}", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["counts"] == {"finished": 1, "failed": 0, "interrupted": 0}
    run_dir = sweep_dir / summary["runs"][0]["run_dir"]
    (rank0_log,) = sweep_dir.glob(".submitit/*/*_0_log.out")  # task 0's stdout
    assert "| 2 ranks" in rank0_log.read_text()  # one process group of both SLURM tasks (gloo)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    (job, values), = _task_results(sweep_dir).items()
    assert values == [final["val_loss"], final["val_loss"]]  # both ranks evaluated the same synchronised model
    print(f"\nslurm ddp: job {job}, 2 tasks, 2 ranks, finished in {time.time() - started:.1f}s; "
          f"val_loss {final['val_loss']:.4f} read back from both tasks and final_metrics.json")


@pytest.mark.slurm
def test_a_job_slurm_kills_is_reported_and_the_others_kept(mnist_root, tmp_path):
    """scancel one job of two while it runs: the launcher does not wait for it for ever (no sacct on the local
    cluster: squeue says it is gone), names it, and the sweep's table keeps the other job's result."""
    need_slurm()
    sweep_dir = tmp_path / "killed"
    args = ["-m", "sweep=slurm", "trainer.max_steps=2,100000", f"data.root={mnist_root}", *TINY[1:],
            f"hydra.sweep.dir={sweep_dir}"]
    sweep = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline, long_job = time.time() + 120, None
        while time.time() < deadline and long_job is None:  # until the long job has started
            time.sleep(0.5)
            long_job = next((s.parent.name for s in sweep_dir.glob("*/status.json")
                             if "trainer.max_steps=100000" in json.loads(s.read_text())["overrides"]), None)
        array = next(sweep_dir.glob(".submitit/*_1")).name  # <array id>_1: the second job of the sweep
        subprocess.run(["scancel", array], check=True)
        stdout, stderr = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, stderr[-3000:]
    assert f"SLURM job {array} ended without a result" in stderr and "Traceback" not in stderr
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["counts"] == {"finished": 1, "failed": 0, "interrupted": 1}
    assert long_job is not None and summary["runs"][1]["run_dir"] == long_job
    print(f"\nslurm scancel: job {array} killed, reported; the other job's val_loss "
          f"{summary['runs'][0]['final/val_loss']:.4f} kept")


@pytest.mark.slurm
def test_a_request_no_node_meets_names_the_key(tmp_path):
    need_slurm()
    nodes = node_limits(None)
    assert nodes, "sinfo lists no node"
    most_gpus, most_cpus = max(n["gpus"] for n in nodes), max(n["cpus"] for n in nodes)
    out = run_cli("-m", "sweep=slurm", *TINY, f"hydra.launcher.gpus_per_node={most_gpus + 1}",
                  f"hydra.launcher.cpus_per_task={most_cpus + 1}", f"hydra.sweep.dir={tmp_path / 'big'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"hydra.launcher.gpus_per_node={most_gpus + 1}, but" in out.stderr
    assert f"hydra.launcher.cpus_per_task={most_cpus + 1} x hydra.launcher.tasks_per_node=1" in out.stderr
    assert not list((tmp_path / "big").glob(".submitit/*/*_submitted.pkl"))  # nothing was submitted
    if most_gpus == 0:  # sbatch itself refuses a gres the cluster lacks: its words and the keys, no traceback
        out = run_cli("-m", "sweep=slurm", *TINY, "hydra.launcher.gres=gpu:1", f"hydra.sweep.dir={tmp_path / 'g'}")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "Invalid generic resource (gres) specification" in out.stderr
        assert "hydra.launcher.gpus_per_node" in out.stderr and "hydra.launcher.gres (now gpu:1)" in out.stderr


def test_without_a_cluster_the_slurm_tests_skip_and_under_ci_fail(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("KILN_REQUIRE_SLURM", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"no SLURM cluster up \(sinfo not found\): `make slurm-up`"):
        need_slurm()
    monkeypatch.setenv("KILN_REQUIRE_SLURM", "1")
    with pytest.raises(pytest.fail.Exception, match="KILN_REQUIRE_SLURM=1 makes that a failure"):
        need_slurm()


# -- without a cluster: the messages -----------------------------------------------------------------------------
NODE = [{"name": "localhost", "cpus": 2, "mem_mb": 12052, "gpus": 0}]
DEFAULTS = {"gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": 4, "partition": None,
            "submitit_folder": "/s/.submitit/%j"}


def test_the_defaults_fit_a_two_cpu_node_without_gpus():
    from hydra import compose, initialize_config_dir

    from tests.conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        launcher = compose("train", overrides=["sweep=slurm"], return_hydra_config=True).hydra.launcher
    params = {k: launcher[k] for k in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "partition")}
    assert params == {k: v for k, v in DEFAULTS.items() if k != "submitit_folder"}
    assert launcher._target_ == "hydra_plugins.kiln_slurm_launcher.KilnSlurmLauncher"
    assert too_big(params, NODE) == []
    # A 2-task DDP job still fits; a third task does not, and the message says which keys.
    assert too_big({**params, "tasks_per_node": 2}, NODE) == []
    assert too_big({**params, "tasks_per_node": 3}, NODE) == [
        "hydra.launcher.cpus_per_task=1 x hydra.launcher.tasks_per_node=3 = 3 CPUs per node, but the nodes of the "
        "default partition have at most 2: set hydra.launcher.cpus_per_task=1 or less"]


def test_each_key_beyond_the_nodes_is_named_with_a_value_that_fits():
    big = {**DEFAULTS, "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "partition": "debug"}
    assert too_big(big, NODE) == [
        "hydra.launcher.gpus_per_node=1, but the nodes of partition 'debug' have at most 0 GPU(s): set "
        "hydra.launcher.gpus_per_node=0 (0: the job trains on CPU)",
        "hydra.launcher.cpus_per_task=8 x hydra.launcher.tasks_per_node=1 = 8 CPUs per node, but the nodes of "
        "partition 'debug' have at most 2: set hydra.launcher.cpus_per_task=2 or less",
        "hydra.launcher.mem_gb=32, but the nodes of partition 'debug' have at most 11.8 GB: set "
        "hydra.launcher.mem_gb=11 or less"]
    # The largest node counts: a request that fits one node of the partition is left to SLURM.
    assert too_big(big, NODE + [{"name": "g1", "cpus": 64, "mem_mb": 512000, "gpus": 8}]) == []


def test_sbatch_refusing_a_gres_names_the_keys():
    said = "sbatch: error: Invalid generic resource (gres) specification\n"
    text = refused_message(said, {**DEFAULTS, "gres": "gpu:1"}, NODE)
    assert text.startswith("SLURM refused the sweep's jobs (sbatch: error: Invalid generic resource (gres) "
                           "specification), so nothing was submitted: ")
    assert "hydra.launcher.gpus_per_node (now 0)" in text and "hydra.launcher.gres (now gpu:1)" in text
    assert text.endswith("The submission script is in /s/.submitit.")
    other = refused_message("sbatch: error: Invalid account or account/partition combination specified",
                            DEFAULTS, None)
    assert "Invalid account" in other and "hydra.launcher.gpus_per_node, tasks_per_node" in other
