"""tests/cuda/: the CUDA-specific paths of kiln. A test marked `cuda` is skipped without a GPU (`make gpu-check`
runs them on one); its CPU variant runs in the normal suite. Each test starts from torch's global settings."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import _dynamo


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (make gpu-check runs the cuda tests on one)")


@pytest.fixture(autouse=True)
def isolated():
    """What one test changes globally is undone before the next: TF32 flags, threads, compiled code, GPU memory."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads())
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[:2]
    torch.set_num_threads(flags[2])
    _dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.empty_cache()
