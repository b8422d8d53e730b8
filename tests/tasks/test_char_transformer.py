"""The character-level GPT: a real causal mask, a sane initial loss, fixed eval batches during training and the
whole validation split at the end, generation with a key/value cache equal to generation without, a CLI run that
learns."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import DataNotFoundError
from tasks.char_transformer import CharTransformer
from tasks.gpt import GPT, KVCache
from tasks.norm import norm_layer
from tests.conftest import run_cli


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40, encoding="utf-8")
    return path


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(norm):
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32,
                norm=lambda n: norm_layer(n, norm)).double().eval()
    x = torch.randint(11, (3, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 11
    a, b = model(x), model(y)
    assert torch.equal(a[:, :9], b[:, :9])  # bit-identical before the changed position
    assert not torch.allclose(a[:, 9:], b[:, 9:])  # and the change is seen from there on


def test_initial_loss_is_about_ln_vocab_and_embeddings_are_tied(text_file):
    task = CharTransformer(str(text_file), block_size=32, batch_size=8, n_layer=2, n_head=2, n_embd=32)
    task.setup(torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model()
    assert model.head.weight is model.tok.weight
    batch = task.train_batch(torch.arange(8) * 5)
    loss = task.loss(model, batch).mean().item()
    assert abs(loss - math.log(task.vocab_size)) < 0.1, (loss, math.log(task.vocab_size))
    x, y = batch
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_eval_uses_the_same_batches_every_time(text_file):
    task = CharTransformer(str(text_file), block_size=16, batch_size=4, n_layer=1, n_head=1, n_embd=16,
                           eval_batches=3, eval_batch_size=5)
    task.setup(torch.device("cpu"))
    model = task.build_model().eval()
    first = task.evaluate(model)
    torch.manual_seed(123)  # the global RNG does not pick the eval windows
    assert task.evaluate(model) == first
    other = CharTransformer(str(text_file), block_size=16, eval_batches=3, eval_batch_size=5)
    other.setup(torch.device("cpu"))
    assert len(task.val_starts) == 3 and all(torch.equal(a, b) for a, b in zip(other.val_starts, task.val_starts))


def split_loss_by_hand(model: GPT, v: torch.Tensor, T: int) -> tuple[float, int]:
    """Per-character cross-entropy over non-overlapping windows of the whole split, window by window."""
    n = (len(v) - 1) // T
    losses = [F.cross_entropy(model(v[i * T : (i + 1) * T][None])[0], v[i * T + 1 : (i + 1) * T + 1], reduction="sum")
              for i in range(n)]
    return sum(losses).item() / (n * T), n


def test_final_figure_is_the_whole_validation_split(text_file):
    """By default evaluations during training score the fixed windows and final_metrics the whole split: every
    validation character predicted once, from non-overlapping block_size windows."""
    task = CharTransformer(str(text_file), block_size=16, batch_size=4, n_layer=1, n_head=1, n_embd=16,
                           eval_batches=2, eval_batch_size=7)
    task.setup(torch.device("cpu"))
    model = task.build_model().eval()
    expected, n = split_loss_by_hand(model, task.val_tokens, 16)
    assert sum(len(s) for s in task.val_starts) == 14 and sum(len(s) for s in task.split_starts) == n
    assert task.final_metrics(model)["val_loss"] == pytest.approx(expected, rel=1e-6)
    windows = task.evaluate(model)["val_loss"]
    by_hand = [F.cross_entropy(model(task.val_tokens[s : s + 16][None])[0], task.val_tokens[s + 1 : s + 17])
               for s in torch.cat(task.val_starts).tolist()]
    assert windows == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-6)
    assert windows != pytest.approx(expected, rel=1e-6)  # a different set of windows: a different figure


def test_eval_batches_null_scores_the_whole_split_every_time(text_file):
    task = CharTransformer(str(text_file), block_size=16, batch_size=4, n_layer=1, n_head=1, n_embd=16,
                           eval_batches=None, eval_batch_size=7)
    task.setup(torch.device("cpu"))
    model = task.build_model().eval()
    assert task.evaluate(model)["val_loss"] == pytest.approx(split_loss_by_hand(model, task.val_tokens, 16)[0],
                                                             rel=1e-6)
    assert task.final_metrics(model) == {}  # the trainer's last evaluation already is the whole split
    task.eval_batches, task.final_whole_split = 2, False
    assert task.final_metrics(model) == {}


def test_a_cached_forward_equals_the_full_forward():
    """Prefill 5 positions, then one position at a time through the cache: the logits of every position are the
    full causal forward's (float64: equal to rounding)."""
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32).double().eval()
    x = torch.randint(11, (3, 16))
    full = model(x)
    cache = KVCache()
    parts = [model(x[:, :5], cache)] + [model(x[:, t : t + 1], cache) for t in range(5, 12)]
    parts.append(model(x[:, 12:], cache))  # several new positions at once after a prefix: the mask is offset
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-12)
    assert cache.length == 16
    with pytest.raises(ValueError, match="longer than block_size=16"):
        model(x[:, :1], cache)


@pytest.mark.parametrize("prompt,new", [(1, 15), (1, 40), (5, 3)])
def test_generation_with_the_cache_equals_generation_without(prompt, new):
    """The same seed gives the same tokens, within the block (cached) and past it (the window slides)."""
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32).double().eval()
    start = torch.randint(11, (2, prompt))
    runs = [model.generate(start, new, generator=torch.Generator().manual_seed(7), use_cache=c) for c in (True, False)]
    assert runs[0].shape == (2, prompt + new) and torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :prompt], start)


def test_split_is_90_10_and_vocab_sorted(text_file):
    task = CharTransformer(str(text_file), block_size=8)
    task.setup(torch.device("cpu"))
    text = text_file.read_text()
    assert len(task.train_tokens) == int(0.9 * len(text)) and len(task.val_tokens) == len(text) - int(0.9 * len(text))
    assert task.chars == sorted(set(text))
    assert task.decode(task.val_tokens[:10].tolist()) == text[int(0.9 * len(text)) :][:10]


def test_missing_text_names_the_path(tmp_path):
    task = CharTransformer(str(tmp_path / "nope.txt"))
    with pytest.raises(DataNotFoundError, match="nope.txt"):
        task.setup(torch.device("cpu"))


def test_fifty_steps_through_the_cli_lower_the_loss(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("recipe=char_transformer_cpu", f"data.root={mnist_root}", "trainer.max_steps=50",
                  "schedule.warmup=10", "trainer.log_interval=10", "trainer.eval_interval=50", "task.eval_batches=4",
                  f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[0] > 3.0 and losses[-1] < losses[0] - 0.4, losses
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["val_loss"] < 3.2


# The GPU recipe's 50-step smoke version on CPU: tests/recipes/test_check_recipes.py (its expect.short block).


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(mnist_root, tmp_path):
    """trainer.compile=true (torch.compile, TorchInductor's C++ backend on CPU) follows the eager run's losses:
    the same math, fused into other kernels, so equal up to float rounding."""
    from tests.conftest import compose_cfg
    from trainer.run import run

    curves = {}
    for compiled in (False, True):
        cfg = compose_cfg("recipe=char_transformer_cpu", f"data.root={mnist_root}", "task.n_layer=1",
                          "task.n_embd=32", "task.n_head=2", "task.block_size=32", "trainer.max_steps=30",
                          "schedule.warmup=5", "trainer.log_interval=5", "trainer.eval_interval=30",
                          "task.eval_batches=2", "task.sample_chars=0", "trainer.checkpoint_interval=0",
                          "trainer.histogram_interval=0", "trainer.progress=off", f"trainer.compile={compiled}")
        final = run(cfg, tmp_path / str(compiled))
        rows = [json.loads(line) for line in (tmp_path / str(compiled) / "metrics.jsonl").read_text().splitlines()]
        curves[compiled] = [r["train/loss"] for r in rows if "train/loss" in r] + [final["val_loss"]]
    assert len(curves[True]) == 7 and curves[True][0] > curves[True][-1] + 0.3  # it learns
    assert curves[True] == pytest.approx(curves[False], rel=1e-4), curves
