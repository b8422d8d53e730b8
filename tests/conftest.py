"""Shared test helpers: compose the real config, find the data root, run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from core.config import compose

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and the train.py processes its tests start) gets its share of the cores:
    two workers with a thread per core each would oversubscribe the CPU and slow every test down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow tests first (a stable sort). `make test` has pytest-xdist hand tests out one at a time in this
    order (--maxschedchunk=1), so the minutes-long ones start at once on every worker instead of one worker
    receiving them all in its first chunk and running them alone at the end (1 s more for 1,000 quick tests)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def compose_cfg(*overrides: str) -> DictConfig:
    """The config `python train.py <overrides>` would run (without the hydra node)."""
    return compose(overrides, struct=False)


# What the data root (KILN_DATA_ROOT, the folder CI points at ../shared/data) must hold for the tests that use data.
DATA = ("MNIST/raw/train-images-idx3-ubyte", "tinyshakespeare/input.txt")


def data_root() -> Path | None:
    root = os.environ.get("KILN_DATA_ROOT")
    if root and all((Path(root) / p).is_file() for p in DATA):
        return Path(root).resolve()
    return None


def need_data() -> Path:
    """The data root, or the test is skipped with one line, the same for every such test (so `-ra` prints it once);
    under CI (CI=true) it fails instead: CI must never skip them silently."""
    root = data_root()
    if root is None:
        where = os.environ.get("KILN_DATA_ROOT")
        where = f"KILN_DATA_ROOT={where} does not hold" if where else "KILN_DATA_ROOT is not set: it must name"
        message = (f"test data not found: {where} the folder with {' and '.join(DATA)}; export "
                   "KILN_DATA_ROOT=/path/to/data (CI uses ../shared/data, see .ci/run)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture
def mnist_root() -> Path:
    return need_data()


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python train.py <args>` in a subprocess, as a user would run it (stdout is not a TTY: plain logs)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory) -> Path:
    """A tiny ImageFolder written from MNIST: train/<digit>/<n>.png, 300 training digits (30 per class), and
    test/<digit>/<n>.png, 50 test digits (5 per class). One per test session."""
    root = need_data()
    from PIL import Image
    from torchvision.datasets import MNIST

    out = tmp_path_factory.mktemp("digits")
    for split, train, per_class in (("train", True, 30), ("test", False, 5)):
        data = MNIST(str(root), train=train, download=False)
        written = dict.fromkeys(range(10), 0)
        for i, (image, label) in enumerate(zip(data.data, data.targets.tolist())):
            if written[label] < per_class:
                folder = out / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.numpy(), mode="L").save(folder / f"{i:05d}.png")
                written[label] += 1
            if all(n == per_class for n in written.values()):
                break
    return out
