"""Train a recipe: `python train.py [recipe=<name>] [group=option ...] [key=value ...]`.

Compose the config (Hydra) -> check (config/) -> build -> fit. Everything else lives in trainer/.
In a multirun (`-m`, a sweep) each job goes through experiments.sweep.run_job: a failed job is recorded and the sweep
goes on, and jobs already finished in the same sweep directory are skipped (the ledger).
"""
# ruff: noqa: E402 (the signal handlers below come before the slow imports)

import signal
import sys
import threading
from functools import partial


def _stopped_during_start_up(signum: int, frame: object) -> None:
    print(f"train.py: stopped by {signal.Signals(signum).name} during start-up; nothing ran.", file=sys.stderr)
    sys.exit(128 + signum)


if __name__ == "__main__":  # Ctrl-C / SIGTERM while Python loads torch and Hydra composes: one line, no traceback
    for _s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_s, _stopped_during_start_up)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import trainer.run
from config import check
from config.cli import check_command_line
from experiments.sweep import run_job  # also registers the ${kiln.direction:...} resolver the Optuna preset uses

run_main = partial(trainer.run.main, check=check)  # compose (Hydra) -> check -> dry run | run


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    if threading.current_thread() is threading.main_thread():
        # From here on a run handles its signals itself (trainer.run); a sweep's launcher sees KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    hc = HydraConfig.get()
    overrides = OmegaConf.to_container(hc.overrides.task)  # as typed: `${...}` is resolved in the config only
    if hc.mode == RunMode.MULTIRUN:
        return run_job(cfg, hc.runtime.output_dir, overrides, hc.sweep.dir, run_main)
    final = run_main(cfg, hc.runtime.output_dir, overrides)
    return final.get(cfg.monitor.metric)  # what sweepers (Optuna) optimise


if __name__ == "__main__":
    check_command_line(sys.argv[1:])  # unknown keys: all at once, with a did-you-mean, exit 2
    main()
