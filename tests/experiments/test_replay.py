"""`python -m experiments.replay <run_dir>`: a CPU run replays bit for bit; the comparison catches a difference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from experiments.replay import compare
from tests.conftest import ROOT, run_cli


def test_a_cpu_run_replays_bit_for_bit(mnist_root, tmp_path):
    run_dir, out_dir = tmp_path / "run", tmp_path / "replay"
    first = run_cli("trainer.device=cpu", "trainer.max_steps=5", "trainer.log_interval=1", "trainer.eval_interval=2",
                    "trainer.pictures=false", "trainer.histogram_interval=0", f"data.root={mnist_root}",
                    f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    replay = subprocess.run([sys.executable, "-m", "experiments.replay", str(run_dir), "--out", str(out_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "MATCH" in replay.stdout and "bit for bit" in replay.stdout
    a, b = (json.loads((d / "final_metrics.json").read_text()) for d in (run_dir, out_dir))
    for timing in ("wall_time_s", "session_wall_time_s", "train_time_s"):
        a.pop(timing), b.pop(timing)
    assert a == b and a["step"] == 5
    losses = [[json.loads(line).get("train/loss") for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (run_dir, out_dir)]
    assert losses[0] == losses[1] and sum(v is not None for v in losses[0]) == 5
    verdict = json.loads((out_dir / "replay.json").read_text())
    assert verdict["match"] and verdict["tolerance"] == 0 and verdict["compared"] > 20
    assert (out_dir / "manifest.json").is_file() and (out_dir / "config.yaml").is_file()


def _fake_run(path, test_loss, losses):
    path.mkdir()
    (path / "final_metrics.json").write_text(json.dumps({"step": 2, "test_loss": test_loss, "wall_time_s": 1.0}))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "train/loss": v,
                                                            "train/samples_per_s": 100.0 * i}) + "\n"
                                                for i, v in enumerate(losses)))


def test_compare_is_exact_by_default_and_tolerant_when_asked(tmp_path):
    _fake_run(tmp_path / "a", 100.0, [3.0, 2.0])
    _fake_run(tmp_path / "b", 100.0, [3.0, 2.0 + 1e-12])  # timings differ too: never compared
    ok, rows = compare(tmp_path / "a", tmp_path / "b", 0.0)
    assert not ok and [r[0] for r in rows if not r[3]] == ["step 2 train/loss"]
    assert compare(tmp_path / "a", tmp_path / "b", 1e-9)[0]
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    assert compare(tmp_path / "a", tmp_path / "c", 0.0)[0]


def test_a_directory_that_is_not_a_run_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.replay", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "not a finished run directory" in out.stderr


def test_tolerance_is_relative_even_for_small_values(tmp_path):
    _fake_run(tmp_path / "a", 100.0, [3.0, 1e-4])
    _fake_run(tmp_path / "b", 100.0, [3.0, 3e-4])  # three times the value: far outside a relative 1e-3
    ok, rows = compare(tmp_path / "a", tmp_path / "b", 1e-3)
    assert not ok and [r[0] for r in rows if not r[3]] == ["step 2 train/loss"]
    _fake_run(tmp_path / "c", 100.0, [3.0, 1e-4 * (1 + 5e-4)])
    assert compare(tmp_path / "a", tmp_path / "c", 1e-3)[0]


def _toy(*overrides):
    from tests.test_resume import toy

    return toy("trainer.checkpoint_interval=2", "trainer.keep_checkpoints=2", "trainer.log_interval=1", *overrides)


def test_replay_of_a_resume_auto_run_writes_only_into_its_new_directory(tmp_path):
    from experiments.replay import main as replay
    from trainer.run import run

    original = tmp_path / "runs" / "a"
    run(_toy("trainer.max_steps=6", "trainer.resume=auto"), original)
    before = {p: p.read_bytes() for p in original.rglob("*") if p.is_file()}
    assert replay([str(original)]) == 0
    assert {p: p.read_bytes() for p in original.rglob("*") if p.is_file()} == before  # untouched
    out = tmp_path / "runs" / "a.replay"
    assert json.loads((out / "replay.json").read_text())["match"]
    assert sorted(json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()
                  if "train/loss" in r) == [1, 2, 3, 4, 5, 6]


def test_replay_resumes_from_the_exact_checkpoint_the_original_resumed_from(tmp_path):
    """B resumed from A's step-4 checkpoint; A then moved on (its step 4 is pruned, its newest is step 8). The
    replay of B must use the checkpoint B really started from (by content hash), not what A holds today."""
    from experiments.replay import main as replay
    from trainer.run import run

    a, b = tmp_path / "a", tmp_path / "b"
    run(_toy("trainer.max_steps=4"), a)
    run(_toy("trainer.max_steps=8", f"trainer.resume={a}"), b)
    run(_toy("trainer.max_steps=8", "optimizer.lr=0.02", f"trainer.resume={a}"), a)  # A moves on, in place
    assert not (a / "checkpoints" / "step-00000004.pt").exists()
    assert replay([str(b), "--out", str(tmp_path / "replay")]) == 0
    verdict = json.loads((tmp_path / "replay" / "replay.json").read_text())
    assert verdict["match"] and verdict["tolerance"] == 0
    assert verdict["resumed_from"]["step"] == 4


def test_replay_refuses_a_resume_source_whose_content_changed(tmp_path, capsys):
    from experiments.replay import main as replay
    from trainer.run import run

    a, b = tmp_path / "a", tmp_path / "b"
    run(_toy("trainer.max_steps=4"), a)
    run(_toy("trainer.max_steps=8", f"trainer.resume={a}"), b)
    manifest = json.loads((b / "manifest.json").read_text())
    kept = b / manifest["start"]["copy"]
    kept.unlink()  # the kept copy is gone and A's own step-4 file now holds other content
    (a / "checkpoints" / "step-00000004.pt").write_bytes((a / "checkpoints" / "step-00000002.pt").read_bytes())
    assert replay([str(b), "--out", str(tmp_path / "replay")]) == 2
    assert "sha256" in capsys.readouterr().err
