"""Training speed of the MNIST CNN through the DataLoader path (0, 1, 2 workers) against the on-device path.

    python bench/data_path.py [--steps 120] [--block 20] [--repeats 2] [--workers 0 1 2] [--data-root ../shared/data]

The same CNN (tasks/mnist_cnn.py: no norm, no dropout, no augmentation), batch 128, Adam, trained by the trainer:

- on device: task=mnist_cnn, the training set as one uint8 tensor, each batch an index into it;
- DataLoader: task=image_classification over torchvision.datasets.MNIST (a PIL image per sample, ToImage, collated
  as uint8, normalised on the device) with data.workers=N.

Each configuration runs --steps steps, --repeats times, interleaved (device, w0, w1, w2, device, ...) so that a
change in the machine's load hits all of them alike. Samples/s is the median over the logged blocks after the
first (worker start-up and warm-up left out) of trainer's train/samples_per_s (training time only). A second table
times the batch source alone (`parts.batches(step)` for --steps steps, no model): how many samples/s each path can
deliver, i.e. how far it is from limiting training. The machine's load (os.getloadavg) is printed before and after:
on a shared machine, compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import compose_cfg  # noqa: E402
from trainer.build import build  # noqa: E402
from trainer.run import run  # noqa: E402

COMMON = ("optimizer=adam", "optimizer.lr=1e-3", "schedule=constant", "trainer.eval_interval=0",
          "trainer.checkpoint_interval=0", "trainer.histogram_interval=0", "trainer.pictures=false",
          "trainer.progress=off", "regularize.dropout=0.0")


def device_cfg(data_root: str, steps: int, block: int):
    return compose_cfg("task=mnist_cnn", f"data.root={data_root}", "task.val_size=1000", "task.batch_size=128",
                       "norm=none", f"trainer.max_steps={steps}", f"trainer.log_interval={block}", *COMMON)


def loader_cfg(data_root: str, steps: int, block: int, workers: int):
    cfg = compose_cfg("task=image_classification", f"data.root={data_root}", f"data.workers={workers}",
                      "task.model._target_=tasks.mnist_cnn.CNN", "task.val_fraction=0.0167", "task.batch_size=128",
                      "task.image_size=null", "task.mean=[0.1307]", "task.std=[0.3081]", "task.num_pictures=0",
                      f"trainer.max_steps={steps}", f"trainer.log_interval={block}", *COMMON)
    cfg.task.train_transform, cfg.task.eval_transform = [], []  # ToImage only: 1x28x28 uint8, as on the device
    return cfg


def samples_per_s(cfg) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, Path(tmp))
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    return statistics.median(rates[1:] or rates)


def loading_only(cfg) -> float:
    """Samples/s of the batch source alone: every micro-batch of the run's steps, on the device (the first step, with
    the workers' start-up, left out)."""
    parts = build(cfg)
    steps = parts.horizon.total_steps - 1
    try:
        for _ in parts.batches(0):
            pass
        start = time.perf_counter()
        for step in range(1, steps + 1):
            for _ in parts.batches(step):
                pass
        elapsed = time.perf_counter() - start
    finally:
        parts.batches.close()
    return steps * parts.task.batch_size / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    ap.add_argument("--data-root", default=os.environ.get("KILN_DATA_ROOT", "data"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    configs = {"on device": lambda: device_cfg(args.data_root, args.steps, args.block)}
    for w in args.workers:
        configs[f"DataLoader, {w} workers"] = lambda w=w: loader_cfg(args.data_root, args.steps, args.block, w)

    print(f"MNIST CNN, batch 128, {args.steps} steps x {args.repeats} repeats, interleaved; {args.threads} training "
          f"thread(s), {os.cpu_count()} cores; load average before: {os.getloadavg()}", flush=True)
    results: dict[str, list[float]] = {name: [] for name in configs}
    start = time.perf_counter()
    for r in range(args.repeats):
        for name, make in configs.items():
            results[name].append(samples_per_s(make()))
            print(f"  repeat {r + 1}: {name:<24} {results[name][-1]:8.0f} samples/s", flush=True)
    loading: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.repeats):
        for name, make in configs.items():
            loading[name].append(loading_only(make()))
            print(f"  repeat {r + 1}: {name:<24} {loading[name][-1]:8.0f} samples/s loaded (no model)", flush=True)
    print(f"load average after: {os.getloadavg()} ({time.perf_counter() - start:.0f} s)")
    base = statistics.median(results["on device"])
    print(f"\n{'path':<24} {'training samples/s':>19} {'vs on device':>13} {'loading alone, samples/s':>25}")
    for name in configs:
        rate, alone = statistics.median(results[name]), statistics.median(loading[name])
        print(f"{name:<24} {rate:19.0f} {rate / base:12.2f}x {alone:25.0f}")


if __name__ == "__main__":
    main()
