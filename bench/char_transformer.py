"""Training speed of the character-level GPT recipes: tokens/s, ms per iteration, and MFU on a GPU.

    python bench/char_transformer.py [--recipe char_transformer_cpu] [--steps 200] [overrides ...]

Runs the real trainer (recipe + overrides, evaluation only at the end) and reads its own timing, which it
logs at every log interval; the first interval (warm-up, compilation) is left out. MFU uses the usual
estimate of 6N + 12 L T d FLOPs per token (Kaplan et al. 2001.08361; PaLM appendix B) against the GPU's
dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import compose_cfg  # noqa: E402
from trainer.run import run  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="char_transformer_cpu")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--interval", type=int, default=20)
    ap.add_argument("--data-root", default=os.environ.get("KILN_DATA_ROOT", "data"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cfg = compose_cfg(f"recipe={args.recipe}", f"data.root={args.data_root}", f"trainer.max_steps={args.steps}",
                      f"trainer.log_interval={args.interval}", "trainer.eval_interval=0",
                      "trainer.checkpoint_interval=0",
                      "trainer.histogram_interval=0", "trainer.pictures=false", "trainer.progress=off",
                      "task.eval_batches=1", "task.final_whole_split=false", *args.overrides)
    if cfg.schedule.get("warmup", 0) and isinstance(cfg.schedule.warmup, int) and cfg.schedule.warmup > args.steps:
        cfg.schedule.warmup = args.steps // 10
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, Path(tmp))
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r][1:]
    tokens_per_s = statistics.median(speeds)
    t = cfg.task
    tokens_per_iter = t.batch_size * t.block_size
    n_params = 12 * t.n_layer * t.n_embd**2  # non-embedding parameters of the blocks
    flops_per_token = 6 * n_params + 12 * t.n_layer * t.block_size * t.n_embd
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.device in ("auto", "cuda") else "cpu"
    print(f"recipe {args.recipe} | device {device} | {torch.get_num_threads()} CPU threads | torch {torch.__version__}")
    print(f"tokens/s {tokens_per_s:,.0f} | ms/iter {tokens_per_iter / tokens_per_s * 1e3:.2f} "
          f"(median of {len(speeds)} intervals of {args.interval} steps, {tokens_per_iter} tokens/iter)")
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        achieved = flops_per_token * tokens_per_s
        mfu = f"{achieved / peak:.1%}" if peak else "unknown peak"
        print(f"GPU {name}: {achieved / 1e12:.1f} TFLOP/s model FLOPs, MFU {mfu}")
    else:
        print(f"model FLOPs {flops_per_token * tokens_per_s / 1e9:.2f} GFLOP/s (MFU is reported on a GPU)")


if __name__ == "__main__":
    main()
