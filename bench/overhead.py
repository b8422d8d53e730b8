"""What the trainer costs over a hand-written PyTorch loop on the same model, data order and seed.

    python bench/overhead.py [--task vae|char|both] [--steps 200] [--repeats 3] [--threads N] [--data-root DIR]

Both loops train, for --steps steps, alternately (A B A B ...) in this one process:
* vae: the MNIST VAE with Adam (constant LR), batch 128; no evaluation.
* char: the char-GPT of recipe char_transformer_cpu (4x4x128, block 64, batch 12; AdamW with decay and no-decay
  groups, warmup + cosine, gradient clipping at norm 1), with the same evaluation work on both sides: the fixed
  validation windows every --eval-interval steps and the whole validation split at the end (no text sample, no
  histograms), then a checkpoint.
The hand-written loops use plain torch only: they share with the trainer nothing but the data tensors (and the
char-GPT's evaluation windows), the model class and the loss function. It prints whether the final weights are
identical, the median time per step of each (timed over blocks of --block steps, repeated --repeats times
alternately) and, for the char-GPT, the whole run's wall time including evaluation, with their ratios (target
<= 1.05).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.char_transformer import CharTransformer  # noqa: E402
from tasks.data import load_mnist  # noqa: E402
from tasks.gpt import GPT  # noqa: E402
from tasks.mnist_vae import VAE, vae_loss  # noqa: E402

CHAR_RECIPE = "char_transformer_cpu"


def hand_written(train_x: torch.Tensor, steps: int, block: int, seed: int = 0, batch: int = 128, lr: float = 1e-3):
    """The loop a user would write: per-epoch permutation, forward, backward, Adam step."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = len(train_x) // batch
    times, tick, perm = [], time.perf_counter(), None
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        if i == 0:  # the same seeded permutation per epoch as the trainer's sampler
            perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        x = train_x[perm[i * batch : (i + 1) * batch]].float().div_(255)
        logits, mu, logvar = model(x)
        loss = vae_loss(logits, x, mu, logvar).sum() / batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % block == 0:
            loss.item()  # a log line's worth of synchronisation, as the trainer does per interval
            now = time.perf_counter()
            times.append((now - tick) / block)
            tick = now
    return model.state_dict(), times


def with_trainer(data_root: str, steps: int, block: int, seed: int = 0):
    from tests.conftest import compose_cfg
    from trainer.checkpoint import load_checkpoint
    from trainer.run import run

    # all 60,000 images, as the hand-written loop (the VAE task holds 5,000 out for validation by default)
    cfg = compose_cfg(f"data.root={data_root}", "task.val_size=0", "monitor.metric=test_loss", "optimizer=adam",
                      "optimizer.lr=1e-3", "schedule=constant", f"trainer.max_steps={steps}",
                      f"trainer.log_interval={block}", "trainer.eval_interval=0", "trainer.checkpoint_interval=0",
                      "trainer.histogram_interval=0", "trainer.pictures=false", "trainer.progress=off",
                      f"trainer.seed={seed}")
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, Path(tmp))
        state = load_checkpoint(Path(tmp) / "checkpoints" / "last.pt")["model"]
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    times = [128 / r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    return state, times


# -- the char-GPT ------------------------------------------------------------------------------------------------
def char_task(data_root: str) -> CharTransformer:
    """The data (tokens on the CPU) and the evaluation windows of the char_transformer_cpu recipe."""
    task = CharTransformer(f"{data_root}/tinyshakespeare/input.txt", block_size=64, batch_size=12)
    task.setup(torch.device("cpu"))
    return task


def char_hand_written(task: CharTransformer, steps: int, block: int, eval_interval: int, out: Path,
                      seed: int = 0, batch: int = 12, lr: float = 1e-3, warmup: int = 100, floor: float = 0.1):
    """nanoGPT's loop for the same recipe: random windows, AdamW (decay on matrices only), linear warmup then
    cosine to floor*lr, clip at norm 1, evaluation of fixed windows at intervals and of the whole split at the end,
    a checkpoint. Returns the final weights, the per-step times of each block and the whole run's seconds."""
    start = time.perf_counter()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = GPT(task.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith(("tok.", "pos."))]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.startswith(("tok.", "pos.")))]
    # fused=True as the recipe sets it (recipes/char_transformer_cpu/optimizer/adamw.yaml): the same kernel
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    params = list(model.parameters())
    window = torch.arange(65)
    n_windows = len(task.train_tokens) - 65
    gen = torch.Generator()

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    @torch.no_grad()
    def val_loss(batches) -> float:
        model.eval()
        total = torch.zeros((), dtype=torch.float64)
        for starts in batches:
            w = task.val_tokens[starts[:, None] + window]
            total += task.loss(model, (w[:, :-1], w[:, 1:])).sum(dtype=torch.float64)
        model.train()
        return total.item() / sum(len(s) for s in batches)

    times, tick, curve = [], time.perf_counter(), []
    for step in range(steps):
        gen.manual_seed(seed * 1_000_003 + step)  # the trainer's per-step seeding of random windows
        w = task.train_tokens[torch.randint(n_windows, (batch,), generator=gen)[:, None] + window]
        loss = task.loss(model, (w[:, :-1], w[:, 1:])).sum() / batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % block == 0:
            loss.item()  # a log line's worth of synchronisation, as the trainer does per interval
            now = time.perf_counter()
            times.append((now - tick) / block)
        if eval_interval and (step + 1) % eval_interval == 0:
            curve.append(val_loss(task.val_starts))
        if (step + 1) % block == 0:
            tick = time.perf_counter()
    final = val_loss(task.split_starts)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": steps}, out / "last.pt")
    return model.state_dict(), times, time.perf_counter() - start, curve + [final]


def char_with_trainer(data_root: str, steps: int, block: int, eval_interval: int, threads: int, warmup: int,
                      seed: int = 0):
    from tests.conftest import compose_cfg
    from trainer.checkpoint import load_checkpoint
    from trainer.run import run

    cfg = compose_cfg(f"recipe={CHAR_RECIPE}", f"data.root={data_root}", f"trainer.max_steps={steps}",
                      f"trainer.log_interval={block}", f"trainer.eval_interval={eval_interval}",
                      "trainer.checkpoint_interval=0", "trainer.histogram_interval=0", "trainer.pictures=false",
                      "trainer.progress=off", f"trainer.seed={seed}", f"trainer.threads={threads}",
                      f"schedule.warmup={warmup}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        final = run(cfg, Path(tmp))
        wall = time.perf_counter() - start
        state = load_checkpoint(Path(tmp) / "checkpoints" / "last.pt")["model"]
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    times = [12 / r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    curve = [r["eval/val_loss"] for r in rows if "eval/val_loss" in r] + [final["val_loss"]]
    return state, times, wall, curve


def bench_char(args: argparse.Namespace) -> bool:
    task = char_task(args.data_root)
    warmup = min(100, args.steps // 5)  # the recipe's 100 steps, or a fifth of a short run
    hand_times, trainer_times, hand_walls, trainer_walls = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            hand_state, t, wall, hand_curve = char_hand_written(task, args.steps, args.block, args.eval_interval,
                                                                Path(tmp), warmup=warmup)
            hand_times += t[1:]
            hand_walls.append(wall)
            trainer_state, t, wall, trainer_curve = char_with_trainer(args.data_root, args.steps, args.block,
                                                                      args.eval_interval, torch.get_num_threads(),
                                                                      warmup)
            trainer_times += t[1:]
            trainer_walls.append(wall)
    identical = all(torch.equal(hand_state[k], trainer_state[k]) for k in hand_state)
    max_diff = max((hand_state[k] - trainer_state[k]).abs().max().item() for k in hand_state)
    hand, trainer = statistics.median(hand_times), statistics.median(trainer_times)
    evals = len(hand_curve) - 1
    print(f"char-GPT ({CHAR_RECIPE}): steps {args.steps}, batch 12, {evals} evaluations of "
          f"{sum(len(s) for s in task.val_starts)} windows + the whole split at the end, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"identical weights after {args.steps} steps: {identical} (max |diff| {max_diff:.3g}); "
          f"val_loss hand {hand_curve[-1]:.4f}, trainer {trainer_curve[-1]:.4f}")
    print(f"hand-written loop: {hand * 1e3:.3f} ms/step (median of {len(hand_times)} blocks of {args.block}), "
          f"whole runs {', '.join(f'{w:.1f}' for w in hand_walls)} s")
    print(f"trainer:           {trainer * 1e3:.3f} ms/step (median of {len(trainer_times)} blocks of {args.block}), "
          f"whole runs {', '.join(f'{w:.1f}' for w in trainer_walls)} s")
    ratio_walls = statistics.median(trainer_walls) / statistics.median(hand_walls)
    print(f"ratio trainer / hand-written: {trainer / hand:.3f} per step, {ratio_walls:.3f} whole run with "
          f"evaluation (target <= 1.05)")
    return identical and hand_curve == trainer_curve


def bench_vae(args: argparse.Namespace) -> bool:
    train_x = load_mnist(args.data_root, download=False)[0].reshape(-1, 784)
    hand_times, trainer_times = [], []
    for _ in range(args.repeats):
        hand_state, t = hand_written(train_x, args.steps, args.block)
        hand_times += t[1:]  # the first block includes warm-up
        trainer_state, t = with_trainer(args.data_root, args.steps, args.block)
        trainer_times += t[1:]
    identical = all(torch.equal(hand_state[k], trainer_state[k]) for k in hand_state)
    max_diff = max((hand_state[k] - trainer_state[k]).abs().max().item() for k in hand_state)
    hand, trainer = statistics.median(hand_times), statistics.median(trainer_times)
    print(f"VAE: steps {args.steps}, batch 128, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"identical weights after {args.steps} steps: {identical} (max |diff| {max_diff:.3g})")
    print(f"hand-written loop: {hand * 1e3:.3f} ms/step (median of {len(hand_times)} blocks of {args.block})")
    print(f"trainer:           {trainer * 1e3:.3f} ms/step (median of {len(trainer_times)} blocks of {args.block})")
    print(f"ratio trainer / hand-written: {trainer / hand:.3f} (target <= 1.05)")
    return identical


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("vae", "char", "both"), default="both")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: vae 200, char 500)")
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--eval-interval", type=int, default=250, help="char-GPT: evaluate every N steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--data-root", default=os.environ.get("KILN_DATA_ROOT", "data"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ok = True
    for task in ("vae", "char") if args.task == "both" else (args.task,):
        run_args = argparse.Namespace(**{**vars(args), "steps": args.steps or {"vae": 200, "char": 500}[task]})
        ok = (bench_vae if task == "vae" else bench_char)(run_args) and ok
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
