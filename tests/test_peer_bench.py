"""bench/peer.py's input checks: it says what is missing and how to give it before it runs anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_data_set_names_the_path_and_the_fix(tmp_path):
    checkout = tmp_path / "nanoGPT"
    checkout.mkdir()
    (checkout / "train.py").write_text("raise SystemExit('must not run')\n")
    empty = tmp_path / "data"
    empty.mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "peer.py"), "--nanogpt", str(checkout),
                           "--only", "nanogpt", "--data-root", str(empty), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"no {empty / 'tinyshakespeare' / 'input.txt'}" in done.stderr
    assert "--data-root" in done.stderr and "KILN_DATA_ROOT" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing ran
