"""The Optuna sweeper of `sweep=optuna_lr_wd`: hydra-optuna-sweeper's, except that a study whose every trial failed
ends with the sweep's summary table (each trial's error) and one clear paragraph, exit 1, rather than Optuna's
`ValueError: No trials are completed yet` and no table. (Hydra finds sweepers in the hydra_plugins namespace.)"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig


class KilnOptunaSweeper(OptunaSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        try:
            return super().sweep(arguments)
        except ValueError:  # Optuna's study.best_trial when no trial completed
            from core.log import print_error
            from experiments.sweep import collect, write_summary

            sweep_dir = Path(self.config.hydra.sweep.dir)
            monitor = self.config.get("monitor") or {}
            metric, mode = monitor.get("metric", "loss"), monitor.get("mode", "min")
            rows = collect(sweep_dir, metric, mode)
            if not rows or any(r["status"] == "finished" for r in rows):
                raise
            write_summary(sweep_dir, metric, mode)
            print_error(f"every one of the {len(rows)} trials of the Optuna study failed (the table above gives each "
                        f"one's error; status.json in each run directory of {sweep_dir} has it in full), so there is "
                        "no best trial. Fix what the errors say and run the sweep again.")
            sys.exit(1)
