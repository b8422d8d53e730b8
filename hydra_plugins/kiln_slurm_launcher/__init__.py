"""The SLURM launcher of `sweep=slurm`: hydra-submitit-launcher's, with three changes. A request no node of the
partition can meet (more GPUs, CPUs or memory than `sinfo` lists; SLURM would queue it for ever, reason
PartitionConfig) or that sbatch refuses ends before anything runs with one paragraph naming the `hydra.launcher.*`
key and a value that fits, exit 2, not submitit's traceback. On a cluster without accounting (sacct) job states come
from squeue. A job SLURM ended without a result (scancel, time or memory limit) is reported with its log folder and
returns None, as a failed job does, so the sweep's other results and its summary are kept."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class KilnSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        import submitit

        from core.log import print_error

        nodes = node_limits(self.params.get("partition"))
        problems = too_big(self.params, nodes or [])
        if problems:  # SLURM may queue such a job for ever (reason PartitionConfig) rather than refuse it
            print_error("no node of the cluster can run the sweep's jobs, so nothing was submitted: " +
                        "; ".join(problems) + ".")
            sys.exit(2)
        watcher = _squeue_when_no_accounting()
        if not isinstance(submitit.slurm.slurm.SlurmJob.watcher, watcher):
            submitit.slurm.slurm.SlurmJob.watcher = watcher(delay_s=600)
        try:
            with _results_one_by_one():
                return super().launch(job_overrides, initial_job_idx)
        except submitit.core.utils.FailedJobError as e:
            if not isinstance(e.__cause__, subprocess.CalledProcessError):  # not sbatch refusing: a job's failure
                raise
            print_error(refused_message(str(e), self.params, nodes))
            sys.exit(2)


class _results_one_by_one:
    """While the launcher waits for its jobs: a job SLURM ended before it returned (submitit's UncompletedJobError)
    gives one line and a None result, as a failed job does in experiments.sweep.run_job, instead of a traceback
    that would drop every other job's result and the sweep's summary."""

    def __enter__(self) -> None:
        import submitit

        self.original = submitit.Job.results

        def results(job: Any) -> list[Any]:
            try:
                return self.original(job)
            except submitit.core.utils.UncompletedJobError as e:
                said = " ".join(str(e).split()[:40]) or type(e).__name__
                print(f"SLURM job {job.job_id} ended without a result ({said}); its logs: {job.paths.folder}",
                      file=sys.stderr)
                return [JobReturn(status=JobStatus.COMPLETED, _return_value=None)]

        submitit.Job.results = results

    def __exit__(self, *exc: Any) -> None:
        import submitit

        submitit.Job.results = self.original


@functools.cache
def _squeue_when_no_accounting() -> type:
    """The watcher class below (built on first use: Hydra imports this module whenever it looks for plugins, and
    submitit takes a while to import)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class _SqueueWhenNoAccounting(SlurmInfoWatcher):
        """submitit learns a job's state from sacct; a cluster without accounting (the local one of `make slurm-up`)
        answers "accounting storage is disabled", so a job SLURM ended without a result would be waited for for ever.
        There squeue gives the state, and a job squeue no longer lists has ended (state ENDED): finished jobs are still
        found by their result files, and one without a result is reported by _results_one_by_one."""

        accounting: bool | None = None

        def update(self) -> None:
            if self.accounting is None:
                probe = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=60)
                type(self).accounting = probe.returncode == 0
            if self.accounting:
                return super().update()
            pending = self._registered - self._finished
            if not pending:
                return
            self._num_calls += 1
            try:  # -r: one line per element of a job array, as submitit names them (<array id>_<index>)
                out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%N"], capture_output=True, text=True,
                                     timeout=60, check=True).stdout
            except (OSError, subprocess.SubprocessError):
                self._last_status_check = time.time()
                return
            listed = {}
            for line in out.splitlines():
                job_id, state, nodes = (line.split("|") + ["", ""])[:3]
                listed[job_id] = {"JobID": job_id, "State": state, "NodeList": nodes}
            for job_id in pending:
                self._info_dict[job_id] = listed.get(job_id, {"JobID": job_id, "State": "ENDED", "NodeList": ""})
            self._last_status_check = time.time()
            for job_id in pending:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

    return _SqueueWhenNoAccounting


def node_limits(partition: str | None) -> list[dict[str, Any]] | None:
    """Each node of the partition (the default one when None) as {"cpus", "mem_mb", "gpus"}, from sinfo; None when
    sinfo is not there or does not answer."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-N", "-o", "%N %c %m %G"] + (["-p", str(partition)] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    nodes = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        gpus = 0
        for gres in parts[3].split(","):  # e.g. gpu:4, gpu:a100:8(S:0-1), (null)
            fields = gres.split("(")[0].split(":")
            if fields[0] == "gpu" and fields[-1].isdigit():
                gpus += int(fields[-1])
        try:
            nodes.append({"name": parts[0], "cpus": int(parts[1]), "mem_mb": int(parts[2].rstrip("+")),
                          "gpus": gpus})
        except ValueError:
            continue
    return nodes


def too_big(params: dict[str, Any], nodes: list[dict[str, Any]]) -> list[str]:
    """For each hydra.launcher key whose request exceeds every node in `nodes`: what to set instead."""
    if not nodes:
        return []
    gpus = int(params.get("gpus_per_node") or 0)
    tasks = int(params.get("tasks_per_node") or 1)
    cpus = int(params.get("cpus_per_task") or 1)
    mem_gb = params.get("mem_gb")
    where = f"partition {params['partition']!r}" if params.get("partition") else "the default partition"
    most_gpus = max(n["gpus"] for n in nodes)
    most_cpus = max(n["cpus"] for n in nodes)
    most_mem = max(n["mem_mb"] for n in nodes)
    problems = []
    if gpus > most_gpus:
        problems.append(f"hydra.launcher.gpus_per_node={gpus}, but the nodes of {where} have at most {most_gpus} "
                        f"GPU(s): set hydra.launcher.gpus_per_node={most_gpus} (0: the job trains on CPU)")
    if tasks * cpus > most_cpus:
        problems.append(f"hydra.launcher.cpus_per_task={cpus} x hydra.launcher.tasks_per_node={tasks} = "
                        f"{tasks * cpus} CPUs per node, but the nodes of {where} have at most {most_cpus}: "
                        f"set hydra.launcher.cpus_per_task={max(1, most_cpus // tasks)} or less")
    if mem_gb is not None and float(mem_gb) * 1024 > most_mem:
        problems.append(f"hydra.launcher.mem_gb={mem_gb}, but the nodes of {where} have at most "
                        f"{most_mem / 1024:.1f} GB: set hydra.launcher.mem_gb={max(1, most_mem // 1024)} or less")
    return problems


def refused_message(sbatch_error: str, params: dict[str, Any], nodes: list[dict[str, Any]] | None) -> str:
    """What to change when sbatch refused the request: sbatch's own words and the keys that size a job."""
    said = " ".join(line.strip() for line in sbatch_error.strip().splitlines() if line.strip()) or "sbatch failed"
    problems = too_big(params, nodes or [])
    if not problems and "gres" in said.lower():
        problems.append(f"the cluster does not offer the generic resource (GPUs) asked for: set "
                        f"hydra.launcher.gpus_per_node (now {params.get('gpus_per_node')}) to 0 on a cluster without "
                        f"GPUs, and check hydra.launcher.gres (now {params.get('gres')}) and any gres in "
                        "hydra.launcher.additional_parameters against what `sinfo -o %G` lists")
    if not problems:
        problems.append("the request is sized by hydra.launcher.gpus_per_node, tasks_per_node, cpus_per_task, "
                        "mem_gb, timeout_min, partition, account and qos (sinfo shows what the nodes offer)")
    folder = Path(str(params.get("submitit_folder", ""))).parent
    return (f"SLURM refused the sweep's jobs ({said}), so nothing was submitted: " + "; ".join(problems) +
            f". The submission script is in {folder}.")
