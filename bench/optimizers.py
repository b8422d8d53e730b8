"""Optimizer step time and state memory on a Transformer-shaped set of CPU tensors (not a test).

    .venv/bin/python bench/optimizers.py [--only adamw,lion] [--steps 10] [--warmup 3] [--params 10M]
                                         [--threads N]

Every option in conf/optimizer/ (composed as `python train.py optimizer=NAME regularize.weight_decay=0.1` would) is
built on the trainer's param groups of a small-GPT-shaped model (embeddings, blocks of LayerNorm + qkv + proj + MLP,
a [65, 384] head; as many blocks as get close to --params). Each step gets fresh random gradients, copied in outside
the timer; after --warmup steps, --steps steps interleave one step of a reference (torch.optim.AdamW(foreach=True))
with one of the optimizer, so background load hits both alike. The table: median step time, its ratio to the
reference's, and state bytes per parameter (every tensor reachable from optimizer.state_dict(), shared storages
once). With several processes on few cores, --threads 1 gives stable figures.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import compose, options  # noqa: E402
from optim.core import state_bytes  # noqa: E402
from optim.param_groups import param_groups  # noqa: E402
from optim.schedule_free import Modes  # noqa: E402

D, VOCAB, CONTEXT = 384, 65, 256


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.qkv, self.proj = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ln2, self.fc, self.out = nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)


class TransformerShaped(nn.Module):
    """Only the parameters of a GPT (no forward): the optimizers see realistic shapes and param groups."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(CONTEXT, D)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB, bias=False)


def block_count(target: float) -> int:
    per_block = sum(p.numel() for p in Block().parameters())
    rest = sum(p.numel() for p in TransformerShaped(0).parameters())
    return max(1, round((target - rest) / per_block))


def parse_count(text: str) -> float:
    """'10M', '2.5e6', '500k' -> a number."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1].lower(), 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


def optimizer_names() -> list[str]:
    return options("optimizer")


def compose_optimizer(name: str) -> Any:
    """cfg.optimizer of `python train.py optimizer=NAME regularize.weight_decay=0.1` (a `_partial_` node)."""
    cfg = compose([f"optimizer={name}", "regularize.weight_decay=0.1"])
    OmegaConf.resolve(cfg)
    return cfg.optimizer


class Runner:
    """One model copy, its optimizer and the way to step it (with the loss if the optimizer asks for it)."""

    def __init__(self, model: nn.Module, make) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.opt = make(param_groups(model))
        Modes(self.opt, model).train()  # a schedule-free optimizer steps in train mode only
        self.needs_loss = getattr(self.opt, "requires_loss", False)

    def step(self, grads: list[torch.Tensor], loss: torch.Tensor) -> float:
        for p, g in zip(self.params, grads, strict=True):
            p.grad.copy_(g)
        start = time.perf_counter()
        self.opt.step(loss=loss) if self.needs_loss else self.opt.step()
        return time.perf_counter() - start

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)


def bench(name: str, base: nn.Module, grad_sets: list[list[torch.Tensor]], warmup: int, steps: int) -> dict:
    row: dict[str, Any] = {"name": name, "target": "?"}
    try:
        node = compose_optimizer(name)
        row["target"] = node.get("_target_", "?")
        make = instantiate(node)
        ref = Runner(copy.deepcopy(base), lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1,
                                                                               foreach=True))
        run = Runner(copy.deepcopy(base), make)
        times: dict[str, list[float]] = {"ref": [], "opt": []}
        for i in range(warmup + steps):
            grads, loss = grad_sets[i % len(grad_sets)], torch.tensor(2.0 / (1 + i))
            if i % 2:  # alternate which goes first: neither always inherits the other's cache state
                t_opt, t_ref = run.step(grads, loss), ref.step(grads, loss)
            else:
                t_ref, t_opt = ref.step(grads, loss), run.step(grads, loss)
            if i >= warmup:
                times["ref"].append(t_ref)
                times["opt"].append(t_opt)
        n = sum(p.numel() for p in run.params)
        row.update(ms=1e3 * statistics.median(times["opt"]), ref_ms=1e3 * statistics.median(times["ref"]),
                   bytes_per_param=state_bytes(run.opt.state_dict()) / n,
                   note="" if run.finite() else "non-finite parameters after the steps")
        row["ratio"] = row["ms"] / row["ref_ms"]
    except Exception as e:  # an optimizer that fails is a row in the table, not a crash
        cause = e.__cause__ or e  # Hydra wraps the real error of a _target_
        last = traceback.extract_tb(cause.__traceback__)[-1]
        message = " ".join(str(cause).split())[:160]
        row["error"] = f"{type(cause).__name__}: {message} ({Path(last.filename).name}:{last.lineno})"
    return row


def table(rows: Iterable[dict]) -> str:
    lines = [f"{'optimizer':<16} {'ms/step':>9} {'x AdamW':>8} {'state B/param':>14}  {'_target_':<32} note",
             "-" * 100]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<16} {'FAILED':>9} {'-':>8} {'-':>14}  {r['target']:<32} {r['error']}")
        else:
            lines.append(f"{r['name']:<16} {r['ms']:>9.1f} {r['ratio']:>8.2f} {r['bytes_per_param']:>14.2f}  "
                         f"{r['target']:<32} {r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated options (default: all of conf/optimizer/)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per optimizer (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (state allocation, caches)")
    ap.add_argument("--params", type=parse_count, default=10e6, help="approximate parameter count, e.g. 10M")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")

    names = optimizer_names()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"--only: unknown optimizer(s) {unknown}; available: {', '.join(names)}")
        names = wanted

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = TransformerShaped(block_count(args.params))
    n = sum(p.numel() for p in base.parameters())
    grad_sets = [[torch.randn_like(p) * 1e-2 for p in base.parameters()] for _ in range(2)]
    tensors = len(list(base.parameters()))
    print(f"{n / 1e6:.2f}M parameters in {tensors} tensors ({len(base.blocks)} blocks of d={D}), fp32, CPU "
          f"with {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{args.warmup} warm-up + {args.steps} timed steps each, reference torch.optim.AdamW(foreach=True)")
    rows = []
    for name in names:
        row = bench(name, base, grad_sets, args.warmup, args.steps)
        rows.append(row)
        status = row.get("error") or f"{row['ms']:.1f} ms (AdamW {row['ref_ms']:.1f} ms)"
        print(f"  {name}: {status}", file=sys.stderr, flush=True)
    refs = [r["ref_ms"] for r in rows if "ref_ms" in r]
    if refs:
        print(f"reference AdamW(foreach=True): median {statistics.median(refs):.1f} ms/step "
              f"(range {min(refs):.1f}-{max(refs):.1f} over the runs), state 8 B/param expected")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
