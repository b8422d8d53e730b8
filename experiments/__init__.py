"""Tools that work across runs: sweeps (ledger and summary), replay, recipe checks, fair comparisons.

`trainer/` holds what one run needs; everything here drives many ordinary runs and reads their run directories.
"""
