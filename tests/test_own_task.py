"""The README's own-task example, taken verbatim from README.md: written as a package in a temporary folder outside
kiln, found through Hydra's search path, it trains through the CLI and resumes exactly."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.test_loop import params

SECTION = "## Your own model and data"


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def write_example(folder) -> None:
    """Every **`path`** followed by a code block in the README section becomes that file; the package files the text
    asks for are created empty."""
    files = re.findall(r"\*\*`([^`]+)`\*\*\n```\w+\n(.*?)```", readme_section(), flags=re.S)
    assert [name for name, _ in files] == ["mylab/my_task.py", "mylab/conf/task/my_task.yaml"]
    for name, body in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(body)
    for empty in re.findall(r"`([\w/]+__init__\.py)`", readme_section()):
        (folder / empty).touch()
    assert (folder / "mylab" / "__init__.py").is_file() and (folder / "mylab" / "conf" / "__init__.py").is_file()


def readme_command() -> str:
    """The first command of the README section's first bash block that runs train.py."""
    block = re.search(r"```bash\n(.*?)```", readme_section(), flags=re.S).group(1)
    return next(line for line in block.splitlines() if "train.py" in line)


def run_readme(folder, *extra: str) -> subprocess.CompletedProcess:
    """The README's command line, run in a shell from the folder holding mylab/, with kiln's real path."""
    command = readme_command().replace("/path/to/kiln/train.py", shlex.quote(str(ROOT / "train.py")))
    command = command.replace("python ", f"{shlex.quote(sys.executable)} ", 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(f"{command} {shlex.join(extra)}", shell=True, cwd=folder, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture
def example(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    write_example(folder)
    return folder


def test_the_readme_example_trains_5_steps_from_its_own_package(example, tmp_path):
    assert "hydra.searchpath=[pkg://mylab.conf]" in readme_command() and "task=my_task" in readme_command()
    out = run_readme(example, "trainer.max_steps=5", "trainer.threads=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["step"] == 5 and 0 < final["val_mse"] < 2
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "_target_: mylab.my_task.SineTask" in config and "metric: val_mse" in config
    out = run_readme(example, "task.hiden=3")  # a typo in a key of the user's own task: named, with the fix
    assert out.returncode == 2 and "task.hiden=3: unknown key; did you mean 'task.hidden'?" in out.stderr, out.stderr


def test_the_readme_example_resumes_exactly_with_workers(example, tmp_path):
    """12 steps straight with 2 workers == 6 steps, then a new process resumed from the step-6 checkpoint with the
    loading in the training process; the per-sample noise of NoisySine is drawn in the loader."""
    common = ("trainer.max_steps=12", "trainer.checkpoint_interval=6", "trainer.keep_checkpoints=0",
              "trainer.log_interval=1", "trainer.eval_interval=6", "trainer.threads=1", "data.workers=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = run_readme(example, *common, f"hydra.run.dir={straight}")
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = straight / "checkpoints" / "step-00000006.pt"
    # resumed with 0 workers: a legitimate change on resume, and the batches do not depend on it
    out = run_readme(example, *common, "data.workers=0", f"trainer.resume={ckpt}", f"hydra.run.dir={resumed}")
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = params(straight), params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logged = lambda d: {r["step"]: r["train/loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text()  # noqa
                                                               .splitlines()) if "train/loss" in r}
    assert sorted(logged(resumed)) == list(range(7, 13))
    assert {s: logged(straight)[s] for s in logged(resumed)} == logged(resumed)
