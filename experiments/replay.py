"""Replay a run directory into a new one and say whether the metrics match.

    python -m experiments.replay runs/mnist_vae/2026-11-21_05-30-00 [--out DIR] [--tolerance 1e-3] [key=value ...]

The replay trains from the run's own resolved config.yaml into a new directory, from where the original started,
and compares final and logged metrics within a relative tolerance: 0 on CPU, 1e-3 on CUDA (how: DESIGN.md).

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

from config import validate
from core.errors import UserError
from core.log import print_error
from trainer.checkpoint import file_digest
from trainer.run import run

_TIMING = ("wall_time_s", "train_time_s", "per_s", "time/")  # keys that measure the machine, not the run
GPU_TOLERANCE = 1e-3


def _timing(key: str) -> bool:
    return any(t in key for t in _TIMING)


def _close(a: Any, b: Any, tol: float) -> bool:
    """Equal within a relative tolerance (|a - b| <= tol * max(|a|, |b|)); no absolute floor, so a learning rate of
    1e-4 and one of 3e-4 differ at any tolerance below 2/3."""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    if math.isnan(a) and math.isnan(b):
        return True
    return a == b if tol == 0 else math.isclose(a, b, rel_tol=tol, abs_tol=0.0)


def _jsonl(path: Path, after: int = 0) -> dict[tuple[int, str], Any]:
    """metrics.jsonl as {(step, key): value} for steps > `after`, timings left out."""
    values: dict[tuple[int, str], Any] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            step = row.pop("step")
            if step > after:
                values.update({(step, k): v for k, v in row.items() if not _timing(k)})
    return values


def compare(original: Path, replay: Path, tolerance: float,
            after: int = 0) -> tuple[bool, list[tuple[str, Any, Any, bool]]]:
    """(all match, rows of (what, original, replay, match)) for the final metrics and the values logged after step
    `after` (the step a replay resumed from)."""
    rows: list[tuple[str, Any, Any, bool]] = []
    a = json.loads((original / "final_metrics.json").read_text())
    b = json.loads((replay / "final_metrics.json").read_text())
    for k in [*a, *(k for k in b if k not in a)]:
        if not _timing(k):
            rows.append((f"final {k}", a.get(k), b.get(k), _close(a.get(k), b.get(k), tolerance)))
    la, lb = _jsonl(original / "metrics.jsonl", after), _jsonl(replay / "metrics.jsonl", after)
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


def starting_point(run_dir: Path, manifest: dict[str, Any]) -> tuple[Path | None, int, str]:
    """Where the replay starts: (checkpoint or None for step 0, its step, why). A run that began from another run's
    checkpoint, or whose config changed at a resume, is replayed from the exact bytes that segment started from
    (its kept copy, checked against the sha256 the manifest recorded); any other run from step 0."""
    start, resumes = manifest.get("start") or {"step": 0}, manifest.get("resumes") or []
    changed = [r for r in resumes if r.get("changes")]
    if changed:
        point, why = resumes[-1], "its config changed at a resume: the last segment is replayed"
    elif start.get("sha256"):
        point, why = start, "it started from another run's checkpoint"
    else:
        return None, 0, "from step 0"
    candidates = [run_dir / point["copy"]] if point.get("copy") else []
    candidates.append(Path(point["checkpoint"]))
    for path in candidates:
        if path.is_file() and file_digest(path) == point["sha256"]:
            return path, int(point["step"]), f"from step {point['step']} ({why})"
    raise UserError(f"{run_dir}: the checkpoint this run resumed from (step {point['step']}, sha256 "
                    f"{point['sha256'][:16]}...) is gone: neither {', '.join(map(str, candidates))} holds those bytes "
                    "any more, so the run cannot be replayed exactly.")


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


    run_dir: Path = args.run_dir
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "final_metrics.json").is_file():
        print_error(f"{run_dir} is not a finished run directory (it needs config.yaml and final_metrics.json)")
        return 2
    out = (args.out or _default_out(run_dir)).resolve()
    if out == run_dir.resolve() or run_dir.resolve() in out.parents or (out.exists() and any(out.iterdir())):
        print_error(f"--out {out}: a replay writes only into a new, empty directory (not the original run's, not an "
                    "existing run's). Pick another --out, or leave it out for a fresh sibling directory.")
        return 2
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    cfg = OmegaConf.load(run_dir / "config.yaml")
    try:
        checkpoint, after, how = starting_point(run_dir, manifest)
    except UserError as e:
        print_error(str(e))
        return 2
    # Never resume=auto (it would find the original and train inside it), never a path looked up today.
    cfg.trainer.resume = str(checkpoint) if checkpoint else None
    cfg.trainer.existing_run = "refuse"
    console.print(f"replaying {how}")
    if args.overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
        console.print(f"replayed with changes: {' '.join(args.overrides)}")
    saved = run_dir / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(saved))] if saved.is_file() else []
    try:
        validate(cfg)
        run(cfg, out, [*overrides, *args.overrides])
    except UserError as e:
        print_error(str(e))
        return e.exit_code

    on_gpu = str(manifest.get("device", "cpu")).startswith("cuda")
    tol = args.tolerance if args.tolerance is not None else (GPU_TOLERANCE if on_gpu else 0.0)
    ok, rows = compare(run_dir, out, tol, after=after)
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
         "resumed_from": {"checkpoint": str(checkpoint), "step": after} if checkpoint else None,
         "differs": [{"value": w, "original": a, "replay": b} for w, a, b, _ in bad]}, indent=2) + "\n")
    if ok:
        console.print(f"[bold green]MATCH[/]: {len(rows)} values ({rule}): final metrics and "
                      f"{sum(r[0].startswith('step') for r in rows)} logged values")
        return 0
    console.print(f"[bold red]MISMATCH[/]: {len(bad)} of {len(rows)} values differ ({rule})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
