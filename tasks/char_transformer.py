"""Character-level language modelling with a small GPT (Tiny Shakespeare by default, any UTF-8 text).

The vocabulary is the sorted set of characters in the text; the first 90% is training data and the last 10%
validation (the common split). All tokens live in one tensor on the device; a training sample is the window
starting at a random offset (RandomSampler: seeded per step).

Validation loss is in nats per character: a fixed set of random windows at each evaluation, the whole
validation split at the end (why: DESIGN.md).

Each evaluation also writes a short text sample to TensorBoard: `sample_chars` characters (100 by default, about
1% of a CPU recipe's time; the first block_size of them through GPT.generate's key/value cache).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from core.errors import DataError, DataNotFoundError
from core.task import Task
from tasks.gpt import GPT, NormFactory


def text_path_problems(path: object) -> list[str]:
    if isinstance(path, str | Path) and str(path) and Path(path).expanduser().is_dir():
        return [f"task.text_path={str(path)!r}: is a folder, not a file; give a UTF-8 text file: "
                "task.text_path=/path/to/file.txt"]
    return []


def read_text(path: str | Path) -> str:
    if problems := text_path_problems(path):
        raise DataError(problems[0])
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(
            f"text not found: looked for {path.resolve()}. Fix: point the data root at the folder that contains "
            f"tinyshakespeare/input.txt, with `data.root=/path/to/data` or `export KILN_DATA_ROOT=/path/to/data`, "
            f"or give any UTF-8 file with `task.text_path=/path/to/file.txt`."
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"task.text_path={path} cannot be read ({e.strerror or e}); make it readable or give "
                        "another file: task.text_path=/path/to/file.txt") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"task.text_path={path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) "
            f"cannot be decoded ({e.reason}). Fix: convert it, e.g. `iconv -f latin1 -t utf-8 {path} > "
            f"{path.with_suffix('.utf8.txt')}` (use the encoding it is really in), and pass "
            f"task.text_path={path.with_suffix('.utf8.txt')}"
        ) from None


class CharTransformer(Task):
    check_evaluate_first = False  # tested against eval_metrics instead (tests/test_validate.py)
    sampling = "random"
    norms = ("none", "layernorm", "rmsnorm")  # BatchNorm1d wants [N, C, L]; the GPT's activations are [B, T, C]
    eval_metrics = {"val_loss": "min"}

    @classmethod
    def check(cls, task: Mapping[str, Any]) -> list[str]:
        heads, width = task["n_head"], task["n_embd"]
        bad = isinstance(heads, int) and isinstance(width, int) and heads > 0 and width % heads
        return super().check(task) + [f"task.n_embd={width}: must be a multiple of task.n_head={heads}"] * bool(bad) \
            + text_path_problems(task.get("text_path"))

    def __init__(self, text_path: str, block_size: int = 64, batch_size: int = 12, n_layer: int = 4,
                 n_head: int = 4, n_embd: int = 128, bias: bool = True, dropout: float = 0.0,
                 norm: NormFactory | None = None, eval_batches: int | None = 15, eval_batch_size: int = 32,
                 final_whole_split: bool = True, sample_chars: int = 100, augment: Callable | None = None) -> None:
        self.text_path, self.block_size, self.batch_size = text_path, block_size, batch_size
        self.model_args = dict(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                               dropout=dropout, bias=bias, norm=norm)
        self.eval_batches, self.eval_batch_size, self.sample_chars = eval_batches, eval_batch_size, sample_chars
        self.final_whole_split = final_whole_split
        self.make_augment, self.augment = augment, None

    def setup(self, device: torch.device) -> None:
        text = read_text(self.text_path)
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        tokens = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n = int(0.9 * len(tokens))
        self.train_tokens, self.val_tokens = tokens[:n].to(device), tokens[n:].to(device)
        if len(self.val_tokens) <= self.block_size + 1:  # the last 10% must hold one validation window
            size = "is empty" if not text else f"has {len(text):,} characters"
            raise DataError(f"task.text_path={self.text_path} {size}: too short for task.block_size={self.block_size} "
                            f"(its last 10%, the validation split, must hold a window of block_size + 2 characters). "
                            f"Fix: a text of at least {10 * (self.block_size + 2):,} characters, or a smaller "
                            f"task.block_size")
        self.window = torch.arange(self.block_size + 1, device=device)
        # The whole split, tiled in non-overlapping windows (the final figure), and the fixed windows that
        # evaluations during training score (the same at every evaluation).
        tiles = torch.arange(0, len(self.val_tokens) - self.block_size, self.block_size)
        if self.eval_batches is None:
            starts = tiles
        else:
            g = torch.Generator().manual_seed(1234)
            starts = torch.randint(len(self.val_tokens) - self.block_size - 1,
                                   (self.eval_batches * self.eval_batch_size,), generator=g)
        self.split_starts = tiles.to(device).split(self.eval_batch_size)
        self.val_starts = starts.to(device).split(self.eval_batch_size)
        if self.make_augment is not None:  # input-token corruption (regularize=augment_text)
            self.augment = self.make_augment(vocab_size=self.vocab_size)
        self.device = device

    @property
    def tokens_per_sample(self) -> int:
        return self.block_size

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def build_model(self) -> nn.Module:
        return GPT(self.vocab_size, **self.model_args)

    @property
    def train_size(self) -> int:
        return len(self.train_tokens) - self.block_size - 1  # number of distinct windows

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = tokens[starts[:, None] + self.window]  # [B, T+1] gathered on the device
        return w[:, :-1], w[:, 1:]

    def train_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._windows(self.train_tokens, indices)
        return (self.augment(x) if self.augment is not None else x), y

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy per window, [B]; the trainer's mean over windows is the per-token mean."""
        x, y = batch
        logits = model(x)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        return ce.view(y.shape).mean(1)

    def _val_loss(self, model: nn.Module, batches: tuple[torch.Tensor, ...]) -> float:
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for starts in batches:
            total += self.loss(model, self._windows(self.val_tokens, starts)).sum(dtype=torch.float64)
        return total.item() / sum(len(s) for s in batches)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """During training: the fixed validation windows (the whole split with eval_batches=null)."""
        return {"val_loss": self._val_loss(model, self.val_starts)}

    @torch.no_grad()
    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """Once, at the end: the whole validation split (nothing more to do when evaluate already scored it)."""
        if self.eval_batches is None or not self.final_whole_split:
            return {}
        return {"val_loss": self._val_loss(model, self.split_starts)}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    @torch.no_grad()
    def sample(self, model: nn.Module, chars: int, seed: int = 0) -> str:
        gpt = getattr(model, "module", model)
        gpt = getattr(gpt, "_orig_mod", gpt)  # torch.compile wrapper
        g = torch.Generator(device=self.device).manual_seed(seed)
        start = torch.tensor([[self.stoi.get("\n", 0)]], device=self.device)
        return self.decode(gpt.generate(start, chars, generator=g)[0, 1:].tolist())

    def pictures(self, model: nn.Module, writer: SummaryWriter, step: int) -> None:
        """A short text sample at each evaluation (TensorBoard's text tab); sample_chars=0 turns it off."""
        if self.sample_chars:
            writer.add_text("sample", "```\n" + self.sample(model, self.sample_chars) + "\n```", step)
