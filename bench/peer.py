"""Wall time against the peers the recipes are measured by: nanoGPT for the char-GPT, pytorch/examples for the VAE.

    python bench/peer.py --nanogpt PATH [--examples PATH] [--threads 1] [--repeats 1] [--only a,b] [--out DIR]

PATH is a checkout of github.com/karpathy/nanoGPT (and of github.com/pytorch/examples), kept outside this
repository: nothing of theirs is copied here. Every workload is one process, timed from start to exit, run in
turn and, with --repeats, round after round (A B C A B C), so each ratio compares runs made minutes apart. Each
process's CPU seconds (user + sys) are reported too: with one thread they are its wall time with a core to itself,
which a busy machine does not stretch, so their ratios check the wall-time ratios.

    nanogpt        nanoGPT's train.py with its README's CPU command (2000 iterations, 4x4x128, block 64,
                   batch 12, eval_iters 20), on Tiny Shakespeare prepared by its own prepare.py
    kiln_cpu       python train.py recipe=char_transformer_cpu (the same configuration, as shipped)
    kiln_cpu_eval  the same with nanoGPT's evaluation work only (no text sample, no histograms)
    kiln_best      python train.py recipe=char_transformer_best_cpu (Muon)
    kiln_no_warmup python train.py recipe=char_transformer_no_warmup (AdamW^2, no warmup)
    examples_vae   pytorch/examples vae/main.py (10 epochs, Adam 1e-3, batch 128)
    kiln_vae       python train.py recipe=mnist_vae_baseline
    plain_vae      bench/plain_vae.py: the same recipe as a plain loop (same draws, same test loss)

For the char-GPT it also reads, as each process prints them, the time of every evaluation: nanoGPT's estimate
(240 random windows per split) and ours (480 fixed windows), so the table gives the time at which the recipe's
estimate first reaches nanoGPT's final one. Both final models are scored over the whole validation split (tiled
windows, every character once): ours by the recipe itself, nanoGPT's checkpoint here, through nanoGPT's own
model code imported from the checkout.

Data: prepare.py reads the text copied from the data root, with a stand-in `requests` that refuses to download;
pytorch/examples reads MNIST through a `data` link to the data root. Threads: OMP_NUM_THREADS=--threads for every
process (and trainer.threads for ours); --threads 0 sets neither. Say what else was running (`uptime`) when you
quote the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NANOGPT_CPU_COMMAND = ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                       "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
                       "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
KILN_EVAL = re.compile(r"eval @ step (\d+): .*?val_loss ([\d.]+)")
EXAMPLES_TEST = re.compile(r"====> Test set loss: ([\d.]+)")
PLAIN_TEST = re.compile(r"test_loss ([\d.]+)$")

# Scores a nanoGPT checkpoint over the whole validation split in block_size windows, as recipes are scored.
SCORE_NANOGPT = """
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from model import GPT, GPTConfig
ckpt = torch.load(sys.argv[2], map_location="cpu", weights_only=False)
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.eval()
val = torch.from_numpy(np.fromfile(sys.argv[3], dtype=np.uint16).astype(np.int64))
T = ckpt["model_args"]["block_size"]
starts = torch.arange(0, len(val) - T, T)
total, count = 0.0, 0
with torch.no_grad():
    for s in starts.split(32):
        w = val[s[:, None] + torch.arange(T + 1)]
        _, loss = model(w[:, :-1].contiguous(), w[:, 1:].contiguous())
        total += loss.item() * len(s) * T
        count += len(s) * T
print(f"{total / count:.6f} {ckpt['iter_num']}")
"""


@dataclass
class Run:
    name: str
    round: int
    wall_s: float
    returncode: int
    cpu_s: float = 0.0  # user + sys seconds of the process (and its children)
    metric: float | None = None  # final: nanoGPT's estimate / our whole split / the VAE's test loss
    whole_split: float | None = None  # nanoGPT: its final checkpoint over the whole validation split
    evals: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds since start, step, val loss)
    note: str = ""


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, pattern: re.Pattern) -> tuple[float, int, list]:
    """Run cmd, timestamping each output line that matches `pattern`; returns (wall s, exit code, matches).
    The CPU seconds it used are in `timed.cpu_s` afterwards."""
    start, cpu = time.perf_counter(), children_cpu_s()
    hits = []
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            match = pattern.search(line.strip())
            if match:
                hits.append((time.perf_counter() - start, match))
        code = proc.wait()
    timed.cpu_s = children_cpu_s() - cpu
    return time.perf_counter() - start, code, hits


def prepare_nanogpt(nanogpt: Path, data_root: Path, env: dict[str, str]) -> None:
    """nanoGPT's own prepare.py, on our copy of the text, never downloading."""
    folder = nanogpt / "data" / "shakespeare_char"
    text = data_root / "tinyshakespeare" / "input.txt"
    if (folder / "val.bin").is_file() and (folder / "input.txt").is_file() and \
            (folder / "input.txt").read_bytes() == text.read_bytes():
        return
    shutil.copyfile(text, folder / "input.txt")
    with tempfile.TemporaryDirectory() as stub:
        (Path(stub) / "requests.py").write_text(
            "def get(*args, **kwargs):\n    raise RuntimeError('bench/peer.py: no downloads; input.txt is in place')\n")
        subprocess.run([sys.executable, "prepare.py"], cwd=folder, check=True, capture_output=True,
                       env={**env, "PYTHONPATH": stub})


def run_nanogpt(args: argparse.Namespace, env: dict[str, str], work: Path, r: int) -> Run:
    out_dir = work / f"nanogpt-{r}"
    wall, code, hits = timed([sys.executable, *NANOGPT_CPU_COMMAND, f"--out_dir={out_dir}"], args.nanogpt, env,
                             work / f"nanogpt-{r}.log", NANOGPT_EVAL)
    run = Run("nanogpt", r, wall, code, evals=[(t, int(m[1]), float(m[3])) for t, m in hits])
    if run.evals:
        run.metric = run.evals[-1][2]
    ckpt = out_dir / "ckpt.pt"
    if code == 0 and ckpt.is_file():
        score = subprocess.run([sys.executable, "-c", SCORE_NANOGPT, str(args.nanogpt), str(ckpt),
                                str(args.nanogpt / "data" / "shakespeare_char" / "val.bin")],
                               env=env, capture_output=True, text=True)
        if score.returncode == 0:
            value, iter_num = score.stdout.split()[-2:]  # model.py prints its parameter count first
            run.whole_split = float(value)
            if int(iter_num) != 2000:
                run.note = f"checkpoint from iteration {iter_num} (its best estimate)"
        else:
            run.note = "could not score the checkpoint: " + score.stderr.strip().splitlines()[-1]
    return run


def run_kiln(name: str, overrides: list[str], metric: str, args: argparse.Namespace, env: dict[str, str],
             work: Path, r: int) -> Run:
    run_dir = work / f"{name}-{r}"
    threads = [f"trainer.threads={args.threads}"] if args.threads else []
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"data.root={args.data_root}", *threads,
           f"hydra.run.dir={run_dir}"]
    wall, code, hits = timed(cmd, ROOT, env, work / f"{name}-{r}.log", KILN_EVAL)
    run = Run(name, r, wall, code, evals=[(t, int(m[1]), float(m[2])) for t, m in hits])
    final = run_dir / "final_metrics.json"
    if code == 0 and final.is_file():
        metrics = json.loads(final.read_text())
        run.metric = metrics.get(metric)
    return run


def run_examples_vae(args: argparse.Namespace, env: dict[str, str], work: Path, r: int) -> Run:
    folder = work / f"examples-{r}"
    (folder / "vae" / "results").mkdir(parents=True)
    (folder / "data").symlink_to(args.data_root)  # main.py reads ../data/MNIST/raw
    wall, code, hits = timed([sys.executable, str(args.examples / "vae" / "main.py")], folder / "vae", env,
                             work / f"examples_vae-{r}.log", EXAMPLES_TEST)
    return Run("examples_vae", r, wall, code, metric=float(hits[-1][1][1]) if hits else None)


def run_plain_vae(args: argparse.Namespace, env: dict[str, str], work: Path, r: int) -> Run:
    wall, code, hits = timed([sys.executable, str(ROOT / "bench" / "plain_vae.py"), f"--data-root={args.data_root}"],
                             ROOT, env, work / f"plain_vae-{r}.log", PLAIN_TEST)
    return Run("plain_vae", r, wall, code, metric=float(hits[-1][1][1]) if hits else None)


WORKLOADS = {
    "nanogpt": lambda a, e, w, r: run_nanogpt(a, e, w, r),
    "kiln_cpu": lambda a, e, w, r: run_kiln("kiln_cpu", ["recipe=char_transformer_cpu"], "val_loss", a, e, w, r),
    "kiln_cpu_eval": lambda a, e, w, r: run_kiln("kiln_cpu_eval", [
        "recipe=char_transformer_cpu", "task.sample_chars=0", "trainer.histogram_interval=0"], "val_loss", a, e, w, r),
    "kiln_best": lambda a, e, w, r: run_kiln("kiln_best", ["recipe=char_transformer_best_cpu"], "val_loss",
                                             a, e, w, r),
    "kiln_no_warmup": lambda a, e, w, r: run_kiln("kiln_no_warmup", ["recipe=char_transformer_no_warmup"],
                                                  "val_loss", a, e, w, r),
    "examples_vae": lambda a, e, w, r: run_examples_vae(a, e, w, r),
    "kiln_vae": lambda a, e, w, r: run_kiln("kiln_vae", ["recipe=mnist_vae_baseline"], "test_loss", a, e, w, r),
    "plain_vae": lambda a, e, w, r: run_plain_vae(a, e, w, r),
}
CHAR = ("nanogpt", "kiln_cpu", "kiln_cpu_eval", "kiln_best", "kiln_no_warmup")
VAE = ("examples_vae", "kiln_vae", "plain_vae")


def first_below(run: Run, level: float) -> float | None:
    """Seconds from the start of the process to its first evaluation at or below `level`."""
    return next((t for t, _, loss in run.evals if loss <= level), None)


def report(runs: list[Run]) -> list[str]:
    by = {name: [r for r in runs if r.name == name and r.returncode == 0] for name in WORKLOADS}
    med = {name: statistics.median(r.wall_s for r in rs) for name, rs in by.items() if rs}
    cpu = {name: statistics.median(r.cpu_s for r in rs) for name, rs in by.items() if rs}
    lines = [f"{'work':<14} {'runs':>4} {'wall s (each)':>16} {'median':>7} {'CPU s (each)':>16} {'median':>7}  result"]
    for name, rs in by.items():
        if not rs:
            continue
        result = ", ".join(
            (f"estimate {r.metric:.4f}" if name == "nanogpt" else
             f"whole split {r.metric:.4f}" if name.startswith("kiln_") and name in CHAR else f"test {r.metric:.2f}")
            + (f" (whole split {r.whole_split:.4f})" if name == "nanogpt" and r.whole_split else "")
            + (f" [{r.note}]" if r.note else "") for r in rs if r.metric is not None)
        each = " ".join(f"{r.wall_s:.0f}" for r in rs)
        each_cpu = " ".join(f"{r.cpu_s:.0f}" for r in rs)
        lines.append(f"{name:<14} {len(rs):>4} {each:>16} {med[name]:>7.1f} {each_cpu:>16} {cpu[name]:>7.1f}  {result}")
    ratios = [("kiln_cpu", "nanogpt"), ("kiln_cpu_eval", "nanogpt"), ("kiln_best", "nanogpt"),
              ("kiln_no_warmup", "nanogpt"),
              ("kiln_vae", "examples_vae"), ("kiln_vae", "plain_vae")]
    lines.append("")
    for a, b in ratios:
        if a in med and b in med:
            pairs = [x.wall_s / y.wall_s for x, y in zip(by[a], by[b]) if x.round == y.round]
            lines.append(f"{a} / {b}: {med[a] / med[b]:.2f} (by round: {', '.join(f'{p:.2f}' for p in pairs)}); "
                         f"CPU seconds {cpu[a] / cpu[b]:.2f}")
    if by["nanogpt"] and by["kiln_best"]:
        for ng, best in zip(by["nanogpt"], by["kiln_best"]):
            reach = first_below(best, ng.metric) if ng.metric is not None else None
            target = f"nanoGPT's final estimate {ng.metric:.4f}" if ng.metric is not None else "?"
            lines.append(
                f"round {ng.round}: kiln_best's estimate first at or below {target} after "
                + (f"{reach:.0f} s = {reach / ng.wall_s:.2f} of nanoGPT's {ng.wall_s:.0f} s" if reach else "never")
                + f"; its final whole split {best.metric:.4f} after {best.wall_s:.0f} s = "
                  f"{best.wall_s / ng.wall_s:.2f} of nanoGPT's time ({best.cpu_s / ng.cpu_s:.2f} in CPU seconds)"
                + (f" (nanoGPT's whole split {ng.whole_split:.4f})" if ng.whole_split else ""))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, help="a checkout of github.com/karpathy/nanoGPT")
    ap.add_argument("--examples", type=Path, help="a checkout of github.com/pytorch/examples (for the VAE rows)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of every process (default 1; 0: each process's own default, nothing set)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every workload, interleaved")
    ap.add_argument("--only", default="", help=f"comma-separated workloads (default: all that have a peer path): "
                                               f"{', '.join(WORKLOADS)}")
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("KILN_DATA_ROOT", "data")))
    ap.add_argument("--out", type=Path, help="where logs, run folders and peer.json go (default: a temp folder)")
    args = ap.parse_args()
    args.data_root = args.data_root.resolve()
    args.nanogpt = args.nanogpt and args.nanogpt.resolve()
    args.examples = args.examples and args.examples.resolve()
    names = [n for n in args.only.split(",") if n] or [
        *(CHAR if args.nanogpt else ()), *(VAE if args.examples else ())]
    unknown = [n for n in names if n not in WORKLOADS]
    needs = [("nanogpt", args.nanogpt, "nanogpt"), ("examples_vae", args.examples, "examples")]
    missing = [f"--{flag} (for {n})" for n, path, flag in needs if n in names and path is None]
    if unknown or missing or not names:
        ap.error(f"unknown workloads {unknown}" if unknown else f"give {', '.join(missing)}" if missing else
                 "give --nanogpt PATH and/or --examples PATH")
    for path, what in ((args.nanogpt, "train.py"), (args.examples, "vae/main.py")):
        if path is not None and not (path / what).is_file():
            ap.error(f"{path} has no {what}: give the root of the checkout")
    needed = {"tinyshakespeare/input.txt": set(CHAR), "MNIST/raw/train-images-idx3-ubyte": set(VAE)}
    for rel, users in needed.items():
        if users & set(names) and not (args.data_root / rel).is_file():
            ap.error(f"no {args.data_root / rel}: give the data root that holds it with --data-root DIR "
                     f"or the KILN_DATA_ROOT environment variable")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    else:  # every process as its user runs it: torch's own default, one thread per core
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(k, None)
    env.pop("PYTHONPATH", None)
    work = args.out or Path(tempfile.mkdtemp(prefix="kiln-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    if "nanogpt" in names:
        prepare_nanogpt(args.nanogpt, args.data_root, env)
    print(f"{len(names)} workloads x {args.repeats} rounds, {args.threads or 'default'} thread(s) each; logs in {work}")
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} CPUs", flush=True)
    runs = []
    for r in range(args.repeats):
        for name in names:
            run = WORKLOADS[name](args, env, work, r)
            run.cpu_s = timed.cpu_s
            runs.append(run)
            print(f"  round {r} {name}: {run.wall_s:.1f} s ({run.cpu_s:.1f} CPU s), exit {run.returncode}"
                  + (f", {run.metric:.4f}" if run.metric is not None else "")
                  + f" (load {os.getloadavg()[0]:.2f})", flush=True)
    lines = report(runs)
    print("\n".join(["", *lines]))
    (work / "peer.json").write_text(json.dumps({"threads": args.threads, "runs": [asdict(r) for r in runs],
                                                "report": lines}, indent=2) + "\n")
    return 1 if any(r.returncode for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
