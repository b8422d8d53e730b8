"""GPU figures of the char-GPT recipe (recipe=char_transformer_gpu): tokens/s and peak memory of a short run, then
the full recipe's wall time and val_loss against its expect block. Figures, not tests (tests/cuda/ holds those).

    python bench/gpu.py              # on a CUDA GPU: throughput, then the full recipe (tens of minutes)
    python bench/gpu.py --quick      # throughput only
    python bench/gpu.py --device cpu --quick   # the same measurement on a small model (exercises it)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import data_root  # noqa: E402
from tests.cuda.harness import RECIPE, overrides, train  # noqa: E402


def throughput(device: str, run_dir: Path) -> dict[str, str]:
    """tokens/s (median over log intervals, the first left out) and peak memory of a short run of the recipe."""
    steps, log = (300, 50) if device == "cuda" else (20, 5)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    done = train(overrides(device, f"trainer.max_steps={steps}", f"trainer.log_interval={log}"), run_dir)
    tokens_per_s = statistics.median(list(done.log.series("train/tokens_per_s").values())[1:])
    t = done.trainer.p.cfg.task
    figures = {"tokens/s": f"{tokens_per_s:,.0f}", "ms/iter": f"{t.batch_size * t.block_size / tokens_per_s * 1e3:.1f}",
               "model": f"{t.n_layer}x{t.n_head}x{t.n_embd}, block {t.block_size}, batch {t.batch_size}"}
    if device == "cuda":
        figures["peak MiB"] = f"{(torch.cuda.max_memory_allocated() - before) / 2**20:,.0f}"
    return figures


def full_recipe(run_dir: Path) -> dict[str, str]:
    """`python train.py recipe=char_transformer_gpu` as it is: wall time and its metric against the expect block."""
    expect = OmegaConf.load(ROOT / "recipes" / f"{RECIPE}.yaml").expect
    start = time.perf_counter()
    subprocess.run([sys.executable, "train.py", f"recipe={RECIPE}", "trainer.progress=plain",
                    f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    limit = expect.target + expect.tolerance
    verdict = "ok" if final[expect.metric] <= limit else "ABOVE"
    return {expect.metric: f"{final[expect.metric]:.4f} ({verdict}: limit {limit:g})",
            "wall s": f"{time.perf_counter() - start:.0f}", "train s": str(final.get("train_time_s")),
            "run dir": str(run_dir)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help=f"throughput only, not the full {RECIPE} recipe")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_gpu", help="the full recipe's run folder")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: CUDA is not available here: nothing to measure (--device cpu measures a small model)")
        return 0
    if data_root() is None:
        print("bench/gpu.py: KILN_DATA_ROOT must name the folder with tinyshakespeare/input.txt")
        return 2
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{RECIPE} on {where} (torch {torch.__version__})")
    with tempfile.TemporaryDirectory() as tmp:
        figures = throughput(args.device, Path(tmp))
    print("  throughput: " + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)
    if not args.quick and args.device == "cuda":
        print("  full recipe: " + ", ".join(f"{k} {v}" for k, v in full_recipe(args.out / RECIPE).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
