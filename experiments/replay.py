"""Replay a run directory into a new one and say whether the metrics match.

    python -m experiments.replay runs/mnist_vae/2026-11-21_05-30-00 [--out DIR] [--tolerance 1e-3] [key=value ...]

The replay trains from the run's own record, `config.yaml` (the fully resolved config, so a later change to a
YAML default cannot change what replays), into a new run directory (default: a sibling `<name>.replay`), then
compares `final_metrics.json` and every logged train loss / eval metric in `metrics.jsonl`, step by step. Timings
(wall_time_s, samples/s, tokens/s) are not compared. On CPU the default tolerance is 0: bit for bit (the loop is a
deterministic function of the seed and step; `trainer.deterministic=true` also pins the few nondeterministic
kernels). On CUDA the default is a relative tolerance of 1e-3, stated in the verdict: atomics in some kernels and
TF32 make GPU runs repeat only approximately. The manifest's package versions and git commit are compared too, and
differences are printed (they explain a mismatch; they do not cause one by themselves).

Exit status: 0 when everything matches, 1 when something differs, 2 for a directory that is not a run.
Extra `key=value` arguments change the replayed config (e.g. data.root=... on another machine) and are stated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

_TIMING = ("wall_time_s", "per_s")  # keys that measure the machine, not the run
GPU_TOLERANCE = 1e-3


def _timing(key: str) -> bool:
    return any(t in key for t in _TIMING)


def _close(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    if math.isnan(a) and math.isnan(b):
        return True
    return a == b if tol == 0 else math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _jsonl(path: Path) -> dict[tuple[int, str], Any]:
    """metrics.jsonl as {(step, key): value}, timings left out."""
    values: dict[tuple[int, str], Any] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            step = row.pop("step")
            values.update({(step, k): v for k, v in row.items() if not _timing(k)})
    return values


def compare(original: Path, replay: Path, tolerance: float) -> tuple[bool, list[tuple[str, Any, Any, bool]]]:
    """(all match, rows of (what, original, replay, match)) for the final metrics and the logged metrics."""
    rows: list[tuple[str, Any, Any, bool]] = []
    a = json.loads((original / "final_metrics.json").read_text())
    b = json.loads((replay / "final_metrics.json").read_text())
    for k in [*a, *(k for k in b if k not in a)]:
        if not _timing(k):
            rows.append((f"final {k}", a.get(k), b.get(k), _close(a.get(k), b.get(k), tolerance)))
    la, lb = _jsonl(original / "metrics.jsonl"), _jsonl(replay / "metrics.jsonl")
    logged = [(f"step {s} {k}", la.get((s, k)), lb.get((s, k)), _close(la.get((s, k)), lb.get((s, k)), tolerance))
              for s, k in sorted(set(la) | set(lb))]
    rows += logged
    return all(ok for *_, ok in rows), rows


def _default_out(run_dir: Path) -> Path:
    out = run_dir.with_name(run_dir.name + ".replay")
    n = 2
    while out.exists():
        out = run_dir.with_name(f"{run_dir.name}.replay{n}")
        n += 1
    return out


def _manifest_differences(original: Path, replay: Path) -> list[str]:
    try:
        a = json.loads((original / "manifest.json").read_text())
        b = json.loads((replay / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ["manifest.json missing in one of the runs"]
    diffs = [f"{name}: {a['packages'].get(name)} -> {b['packages'].get(name)}"
             for name in sorted(set(a.get("packages", {})) | set(b.get("packages", {})))
             if a.get("packages", {}).get(name) != b.get("packages", {}).get(name)]
    for key in ("device", "device_name", "python", "git"):
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)} -> {b.get(key)}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds config.yaml and final_metrics.json)")
    parser.add_argument("--out", type=Path, help="where the replay runs (default: <run_dir>.replay)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"relative tolerance (default: 0 = bit for bit on CPU, {GPU_TOLERANCE} on CUDA)")
    parser.add_argument("--show", type=int, default=12, help="how many compared values to print (mismatches first)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the replayed config")
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))

    from trainer.errors import UserError
    from trainer.log import print_error
    from trainer.run import run
    from trainer.validate import validate

    run_dir: Path = args.run_dir
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "final_metrics.json").is_file():
        print_error(f"{run_dir} is not a finished run directory (it needs config.yaml and final_metrics.json)")
        return 2
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.trainer.get("resume"):
        console.print(f"note: the original resumed from {cfg.trainer.resume}; the replay resumes from it too")
    if args.overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
        console.print(f"replayed with changes: {' '.join(args.overrides)}")
    saved = run_dir / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(saved)] if saved.is_file() else []
    out = args.out or _default_out(run_dir)
    try:
        validate(cfg)
        run(cfg, out, [*overrides, *args.overrides])
    except UserError as e:
        print_error(str(e))
        return e.exit_code

    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    on_gpu = str(manifest.get("device", "cpu")).startswith("cuda")
    tol = args.tolerance if args.tolerance is not None else (GPU_TOLERANCE if on_gpu else 0.0)
    ok, rows = compare(run_dir, out, tol)
    rule = "bit for bit" if tol == 0 else f"relative tolerance {tol:g}"
    bad = [r for r in rows if not r[3]]
    table = Table(title=f"replay of {run_dir} -> {out} ({rule})")
    for col in ("value", "original", "replay", "diff", ""):
        table.add_column(col, justify="left" if col == "value" else "right")
    for what, a, b, match in (bad + [r for r in rows if r[3]])[: max(args.show, len(bad[:50]))]:
        diff = abs(a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""
        table.add_row(what, repr(a), repr(b), f"{diff:.3g}" if diff != "" else "",
                      "[green]ok[/]" if match else "[red]differs[/]")
    console.print(table)
    for line in _manifest_differences(run_dir, out):
        console.print(f"  environment differs: {line}")
    (out / "replay.json").write_text(json.dumps(
        {"original": str(run_dir), "match": ok, "tolerance": tol, "compared": len(rows),
         "differs": [{"value": w, "original": a, "replay": b} for w, a, b, _ in bad]}, indent=2) + "\n")
    if ok:
        console.print(f"[bold green]MATCH[/]: {len(rows)} values ({rule}): final metrics and "
                      f"{sum(r[0].startswith('step') for r in rows)} logged values")
        return 0
    console.print(f"[bold red]MISMATCH[/]: {len(bad)} of {len(rows)} values differ ({rule})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
