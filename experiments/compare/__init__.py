"""Fair comparisons: `python -m experiments.compare optimizer=adamw,lion task=... [--seeds 5] [--screen] ...`.

Is option A better than option B on this task, and by how much? Each option's learning rate is tuned with the same
budget on a log grid relative to its own default (successive halving), the chosen settings run with paired seeds,
and the report gives means with confidence intervals, a paired test against the baseline (Holm-corrected), the
probability of improvement, a verdict, time to target and the diverged share, with figures. The references:
Google's tuning playbook (the learning rate is a nuisance parameter, tuned per option), AlgoPerf (time to target
after equal tuning), DeepOBS (a log grid, then several seeds), modded-nanogpt (a claim needs a significance test
over runs).

Modules, in the order a comparison uses them: plan (the axis, options, budget, grid, every trial's command line),
tuning (successive halving), runs (trials through the sweep ledger, worker processes, Ctrl-C), probe (--dry-run's
estimate), stats (scipy.stats), report and figures (report.md, compare.json/.csv, PNGs, the table), cli.
"""
