"""The harness of tests/cuda and the GPU benchmark's measurement, on the CPU: without the data root the runs skip
with one line (and fail under CI); bench/gpu.py's throughput figures come from the trainer's own timing."""

from __future__ import annotations

import pytest

from bench import gpu
from tests.cuda.harness import overrides


def test_without_the_data_root_the_runs_skip_with_one_line_and_fail_under_ci(monkeypatch):
    monkeypatch.delenv("KILN_DATA_ROOT", raising=False)
    monkeypatch.delenv("CI", raising=False)
    line = "test data not found: KILN_DATA_ROOT is not set: it must name the folder with MNIST/raw/"
    with pytest.raises(pytest.skip.Exception, match=line):
        overrides("cpu")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=line):
        overrides("cpu")


def test_the_gpu_bench_measures_throughput_of_the_recipe_model(tmp_path):
    figures = gpu.throughput("cpu", tmp_path)
    assert float(figures["tokens/s"].replace(",", "")) > 0
    assert figures["model"] == "2x2x64, block 32, batch 8"  # the CPU stand-in for the recipe's char-GPT
    assert "peak MiB" not in figures  # a CUDA figure
