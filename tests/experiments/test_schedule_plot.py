"""`python -m experiments.schedule_plot schedule=<name> ...` writes a PNG of the LR curve of the composed config."""

from __future__ import annotations

import subprocess
import sys

import pytest

from experiments import schedule_plot as plot
from tests.conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"
NAMES = sorted(p.stem for p in (ROOT / "conf" / "schedule").glob("*.yaml"))


def test_the_module_command_writes_a_png(tmp_path):
    out = tmp_path / "pics" / "sgdr.png"
    done = subprocess.run([sys.executable, "-m", "experiments.schedule_plot", "schedule=sgdr", "schedule.decay=0.5",
                           "trainer.max_steps=300", f"out={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {out}" in done.stdout
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000


@pytest.mark.parametrize("name", NAMES)
def test_every_schedule_plots_without_data(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_DATA_ROOT", str(tmp_path / "no-data-here"))
    out = plot.main([f"schedule={name}", "trainer.max_steps=60", f"out={tmp_path / 'x.png'}"])
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000


def test_horizon_from_epochs_and_steps_per_epoch():
    cfg, name = plot.compose_config(["schedule=wsd", "trainer.max_epochs=3"])
    assert name == "wsd"
    # MNIST less the 5000 validation images, batch 128: 429 steps per epoch
    assert plot.horizon_of(cfg, None).total_steps == 3 * (55_000 // 128)
    h = plot.horizon_of(cfg, 10)
    assert (h.total_steps, h.steps_per_epoch) == (30, 10)


def test_bad_schedule_option_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="schedule.shape='sqrt'"):
        plot.main(["schedule=wsd", "schedule.shape=sqrt", "trainer.max_steps=50",
                   f"out={tmp_path / 'x.png'}"])
