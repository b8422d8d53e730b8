"""The real command line, in subprocesses: what a user types and what they see."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def test_one_epoch_vae_through_the_cli(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("recipe=mnist_vae", "optimizer=adamw", "schedule=cosine_warmup", f"data.root={mnist_root}",
                  "trainer.max_epochs=1",
                  f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["test_loss"] < 140.0 and final["val_loss"] < 140.0, final
    assert final["step"] == 429  # (60000 - 5000 validation images) // 128, incomplete last batch dropped
    # Plain progress lines (stdout is not a TTY) and the final table.
    assert "step 50/429" in out.stdout and "samples/s" in out.stdout and "eta" in out.stdout
    assert "final metrics" in out.stdout and "val_loss" in out.stdout and "test_loss" in out.stdout
    # Everything a run directory promises.
    for name in ("config.yaml", "overrides.yaml", "manifest.json", "metrics.jsonl", "checkpoints/last.pt",
                 "checkpoints/step-00000429.pt", "pictures/latent_space.png"):
        assert (run_dir / name).is_file(), name
    assert_tensorboard_has_everything(run_dir / "tb")
    assert "optimizer=adamw" in (run_dir / "overrides.yaml").read_text()


def test_unknown_optimizer_lists_the_choices(tmp_path):
    out = run_cli("optimizer=adamx", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert "Could not find 'optimizer/adamx'" in out.stderr
    for choice in ("adam", "adamw", "momentum", "sgd"):
        assert f"\t{choice}\n" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_data_is_one_clear_paragraph(tmp_path):
    empty = tmp_path / "nothing-here"
    out = run_cli(f"data.root={empty}", "data.download=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    message = " ".join(out.stderr.split())
    assert "MNIST not found" in message
    assert str(empty / "MNIST" / "raw") in message
    assert "data.root=" in message and "KILN_DATA_ROOT" in message


def test_bad_value_is_reported_with_its_key_and_exit_code_2(mnist_root, tmp_path):
    out = run_cli("optimizer.lr=-1", f"data.root={mnist_root}", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2, out.stderr
    assert "optimizer" in out.stderr and "-1" in out.stderr
    assert "Traceback" not in out.stderr


def test_recipe_runs_from_another_working_directory(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("recipe=mnist_vae_baseline", f"data.root={mnist_root}", "trainer.max_steps=3",
                  "trainer.log_interval=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    config = (run_dir / "config.yaml").read_text()
    assert "torch.optim.Adam\n" in config and "schedules.constant" in config


def assert_tensorboard_has_everything(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "lr/decay", "lr/no_decay",
            "eval/val_loss"} <= set(tags["scalars"])
    assert {"vae/reconstructions", "vae/samples", "vae/latent_space"} <= set(tags["images"])
    for name in ("encoder.0.weight", "decoder.1.bias"):  # per layer, parameters and gradients
        assert f"params/{name}" in tags["histograms"] and f"grads/{name}" in tags["histograms"]
    assert [e.step for e in events.Scalars("eval/val_loss")] == [429]
    assert not [t for t in tags["scalars"] if t.startswith("eval/test")]  # the test set is scored at the end only


def test_unknown_keys_are_all_reported_with_a_did_you_mean(tmp_path):
    out = run_cli("trainer.devise=cpu", "optimizer=sgd", "optimizer.lrr=0.1", "clip=norm", "clip.norm.max_norn=2",
                  "task.batch_size=64", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    message = " ".join(out.stderr.split())
    assert "3 unknown keys" in message
    for bad, good in [("trainer.devise", "trainer.device"), ("optimizer.lrr", "optimizer.lr"),
                      ("clip.norm.max_norn", "clip.norm.max_norm")]:
        assert f"{bad}=" in message and f"did you mean '{good}'?" in message
    assert "task.batch_size" not in message
