"""task=image_classification on a tiny ImageFolder of MNIST digits: it trains through the CLI, resumes bit-exactly
after SIGTERM with 2 workers, applies norm and dropout choices or refuses them by name, and reports broken data."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from core.errors import ConfigError, DataError, DataNotFoundError, UserError
from tests.conftest import ROOT, run_cli
from tests.test_batches import digits_cfg
from tests.test_loop import params
from trainer.build import build
from trainer.run import run


def digits_args(folder, run_dir, *extra, width=8):
    return ["task=image_classification", "task.dataset._target_=torchvision.datasets.ImageFolder",
            f"task.dataset.root={folder / 'train'}", f"+task.model.width={width}", "task.batch_size=16",
            "task.eval_batch_size=64", "trainer.log_interval=1", "trainer.histogram_interval=0",
            "trainer.threads=1", "trainer.pictures=false", f"hydra.run.dir={run_dir}", *extra]


def rows(run_dir):
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trains_on_an_image_folder_through_the_cli(digit_folder, tmp_path):
    """270 training digits, a tiny CNN, 150 steps (~9 epochs) with 2 workers: validation accuracy far above chance
    (0.1; 0.63-0.70 measured); the test split is scored once at the end; pictures are written."""
    out = run_cli(*digits_args(digit_folder, tmp_path, "trainer.max_steps=150", "trainer.eval_interval=75",
                               "optimizer.lr=2e-2", "data.workers=2", "trainer.pictures=true",
                               f"task.test_split={{root:{digit_folder / 'test'}}}",
                               width=16))
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["step"] == 150 and final["val_acc"] >= 0.5 and final["val_loss"] < 1.6, final
    assert 0 <= final["test_acc"] <= 1 and final["test_loss"] > 0  # 50 test digits, scored once
    losses = [r["train/loss"] for r in rows(tmp_path) if "train/loss" in r]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.5  # from ~2.3 (ln 10)
    assert {p.name for p in (tmp_path / "pictures").iterdir()} == {"predictions.png", "confusion_matrix.png"}
    assert "test_acc" not in [k for r in rows(tmp_path) for k in r]  # never in the per-evaluation metrics


@pytest.mark.slow
def test_sigterm_and_resume_with_2_workers_equals_the_straight_run(digit_folder, tmp_path):
    """K steps, SIGTERM, resume, N-K steps == N steps straight, bit for bit: random crops in 2 workers, dropout,
    BatchNorm, an evaluation on the way."""
    n = 24
    common = ("data.workers=2", f"trainer.max_steps={n}", "trainer.eval_interval=10", "trainer.checkpoint_interval=0",
              "regularize.dropout=0.2")
    straight = tmp_path / "straight"
    out = run_cli(*digits_args(digit_folder, straight, *common))
    assert out.returncode == 0, out.stderr[-3000:]

    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *digits_args(digit_folder, run_dir, *common)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 8:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    k = max(r["step"] for r in rows(run_dir) if "train/loss" in r)
    assert 8 <= k < n

    out = run_cli(*digits_args(digit_folder, run_dir, *common, f"trainer.resume={run_dir}"))
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = params(straight), params(run_dir)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    loss = lambda d: {r["step"]: r["train/loss"] for r in rows(d) if "train/loss" in r}  # noqa: E731
    assert loss(run_dir) == loss(straight) and sorted(loss(run_dir)) == list(range(1, n + 1))
    acc = lambda d: {r["step"]: r["eval/val_acc"] for r in rows(d) if "eval/val_acc" in r}  # noqa: E731
    assert acc(run_dir) == acc(straight)


def test_the_issue_command_line_trains_a_torchvision_resnet(digit_folder, tmp_path):
    out = run_cli("task=image_classification", "task.dataset._target_=torchvision.datasets.ImageFolder",
                  f"task.dataset.root={digit_folder / 'train'}", "task.model._target_=torchvision.models.resnet18",
                  "task.num_classes=10", "optimizer=lion", "schedule=wsd", "data.workers=2", "task.batch_size=8",
                  "trainer.max_steps=2", "trainer.log_interval=1", "trainer.threads=1", "trainer.pictures=false",
                  f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "final_metrics.json").read_text())["step"] == 2
    assert "11,181,642 parameters" in out.stdout  # resnet18 with a 10-class head


# -- norm and dropout: applied where the model takes them, refused by name where it does not -----------------------
def model_of(folder, *overrides):
    parts = build(digits_cfg(folder, *overrides))
    parts.batches.close()
    return parts.model


def test_norm_and_dropout_reach_torchvision_models(digit_folder):
    resnet = model_of(digit_folder, "task.model._target_=torchvision.models.resnet18", "norm=layernorm")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    assert sum(isinstance(m, nn.LayerNorm) for m in resnet.modules()) == 20  # every norm of resnet18
    default = model_of(digit_folder, "task.model._target_=torchvision.models.resnet18")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in default.modules()) == 20  # norm=model: its own
    mobile = model_of(digit_folder, "task.model._target_=torchvision.models.mobilenet_v3_small",
                      "regularize.dropout=0.3", "norm=rmsnorm")
    assert [m.p for m in mobile.modules() if isinstance(m, nn.Dropout)] == [0.3]
    assert any(isinstance(m, nn.RMSNorm) for m in mobile.modules())
    assert mobile.classifier[-1].out_features == 10


@pytest.mark.parametrize(("overrides", "message"), [
    (("task.model._target_=torchvision.models.squeezenet1_1", "norm=layernorm"),
     "norm=layernorm: torchvision.models.squeezenet1_1 takes no `norm_layer` argument"),
    (("task.model._target_=torchvision.models.resnet18", "regularize.dropout=0.2"),
     "regularize.dropout=0.2: torchvision.models.resnet18 takes no `dropout` argument"),
    (("task.model._target_=tests.tasks.test_image_classification.ignores_class_count",),
     "outputs shape (1, 7) for one image, not [1, task.num_classes=10]"),
    (("task.num_classes=37",), "task.num_classes=37: the data set has 10 classes"),
    (("task.image_size=32", "task.eval_transform=[{_target_:torchvision.transforms.v2.RGB}]"),
     "task.image_size=32: task.eval_transform gives (28, 28) images"),
    (("task.model._target_=torchvision.models.alexnet",), "task.model (torchvision.models.alexnet) fails on one "
                                                           "(3, 28, 28) image"),
])
def test_a_choice_the_model_cannot_take_is_a_config_error(digit_folder, overrides, message):
    with pytest.raises(ConfigError) as e:
        model_of(digit_folder, *overrides)
    assert message in str(e.value)


def ignores_class_count(num_classes, dropout=0.0):
    from tasks.image_classification import SmallCNN

    return SmallCNN(num_classes=7, width=4)


# -- data errors ---------------------------------------------------------------------------------------------------
def test_a_missing_or_empty_folder_is_named_with_the_fix(digit_folder, tmp_path):
    out = run_cli(*digits_args(digit_folder, tmp_path / "run", "trainer.max_steps=2",
                               f"task.dataset.root={tmp_path / 'nowhere'}"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"task.dataset.root={tmp_path / 'nowhere'}: no such folder" in out.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match=r"task.dataset \(torchvision.datasets.ImageFolder.*Couldn't find any "
                                                r"class folder.*<root>/<class name>/<image>"):
        build(digits_cfg(digit_folder, f"task.dataset.root={tmp_path / 'empty'}"))
    (tmp_path / "empty" / "cat").mkdir()
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataNotFoundError, match="Found no valid file"):
        build(digits_cfg(digit_folder, f"task.dataset.root={tmp_path / 'empty'}"))


def test_an_image_that_fails_to_decode_stops_the_run_or_is_skipped(digit_folder, tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(digit_folder / "train", folder / "train")
    broken = sorted((folder / "train" / "3").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated PNG
    (folder / "train" / "5" / "empty.png").write_bytes(b"")

    # default (error): a run that meets a broken image stops with its name, in a worker or not
    for workers in (0, 2):
        with pytest.raises(UserError, match=r"task.dataset: image .*(3/.*\.png|5/empty\.png) could not be decoded"):
            run(digits_cfg(folder, "task.batch_size=150", "trainer.max_steps=4", f"data.workers={workers}"),
                tmp_path / f"run{workers}")
    out = run_cli(*digits_args(folder, tmp_path / "cli", "task.batch_size=150", "trainer.max_steps=4",
                               "data.workers=2"))
    assert out.returncode == 1 and "Traceback" not in out.stderr and "task.bad_images=skip" in out.stderr

    # skip: found at setup, left out and counted
    parts = build(digits_cfg(folder, "task.bad_images=skip", "task.val_fraction=0.1"))
    parts.batches.close()
    assert parts.task.skipped_images == 2
    assert len(parts.task.train_set) + len(parts.task.val_set) == 300 + 1 - 2


def test_bad_values_are_reported_together_before_any_data_loads():
    from config import problems
    from tests.conftest import compose_cfg

    lines = problems(compose_cfg("task=image_classification", "task.val_fraction=1.5", "task.num_classes=1",
                                 "task.bad_images=ignore", "+task.dataset.roott=/x", "data.workers=-1",
                                 "data.pin_memory=maybe"))
    assert lines == ["task.dataset.roott='/x': unknown key for torchvision.datasets.MNIST; did you mean 'root'?",
                     "task.val_fraction=1.5: must be a number in (0, 1)",
                     "task.num_classes=1: must be null or an int >= 2",
                     "task.bad_images='ignore': must be one of error, skip",
                     "data.workers=-1: must be an int >= 0",
                     "data.pin_memory='maybe': must be auto or true or false"]


# -- every split numbers its classes as the training split does -----------------------------------------------------
def folder_copy(digit_folder, dest, split="test", drop=(), add=()):
    """A copy of one split of the digits, without the class folders `drop` and with class folders `add` (two images
    of digit 1 each)."""
    shutil.copytree(digit_folder / split, dest)
    for name in drop:
        shutil.rmtree(dest / name)
    for name in add:
        shutil.copytree(digit_folder / split / "1", dest / name)
    return dest


def test_a_split_missing_a_class_is_labelled_by_class_name(digit_folder, tmp_path, capsys):
    """A validation folder without the class 0 folder: torchvision numbers its folders 1..9 as 0..8; every label must
    still be the training split's index of its folder's name."""
    val = folder_copy(digit_folder, tmp_path / "val", drop=["0"])
    test = folder_copy(digit_folder, tmp_path / "test", drop=["0", "9"])
    parts = build(digits_cfg(digit_folder, f"task.val_split={{root:{val}}}", f"task.test_split={{root:{test}}}"))
    parts.batches.close()
    task = parts.task
    for split, folder in ((task.val_set, val), (task.test_set, test)):
        assert split.base.root == str(folder)
        truth = [int(path.split("/")[-2]) for path, _ in split.base.samples]  # the folder name is the digit
        assert [split[i][1] for i in range(len(split))] == truth
    err = capsys.readouterr().err
    assert f"task.val_split (root={val}) has no images of class 0" in err
    assert f"task.test_split (root={test}) has no images of classes 0, 9" in err


def test_a_split_with_classes_the_training_split_lacks_is_refused_by_name(digit_folder, tmp_path):
    val = folder_copy(digit_folder, tmp_path / "val", drop=["3"], add=["cat", "dog"])
    with pytest.raises(DataError) as e:
        build(digits_cfg(digit_folder, f"task.val_split={{root:{val}}}"))
    message = str(e.value)
    assert message.startswith(f"task.val_split (root={val}) has classes the training split (task.dataset.root="
                              f"{digit_folder / 'train'}) lacks: cat, dog")
    assert "(it also lacks class 3" in message


# -- images of different sizes -------------------------------------------------------------------------------------
def sized_folder(root, sizes):
    """An ImageFolder of grey squares: class a, then b, one image per entry of `sizes` ((h, w)), named 00.png ..."""
    from PIL import Image

    half = len(sizes) // 2
    for i, (h, w) in enumerate(sizes):
        folder = root / ("a" if i < half else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (w, h), color=i * 10).save(folder / f"{i % half:02d}.png")
    return root


NO_RESIZE = ("task.train_transform=[{_target_:torchvision.transforms.v2.RGB}]",
             "task.eval_transform=[{_target_:torchvision.transforms.v2.RGB}]", "task.image_size=null")


def test_images_of_different_sizes_without_a_resize_are_refused_before_training(tmp_path):
    sized_folder(tmp_path / "train", [(28, 28)] * 7 + [(32, 40)] * 9)
    with pytest.raises(ConfigError) as e:
        build(digits_cfg(tmp_path, *NO_RESIZE, "task.val_split={root:" + str(tmp_path / "train") + "}"))
    message = str(e.value)
    assert message.startswith("task.train_transform gives images of different sizes: (3, 28, 28) for image "
                              f"{tmp_path / 'train' / 'a' / '00.png'}, (3, 32, 40) for image "
                              f"{tmp_path / 'train' / 'b' / '00.png'}")
    assert "RandomResizedCrop" in message and "task.eval_transform" not in message.split(";")[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_images_of_different_sizes_met_in_a_batch_name_the_keys(tmp_path, workers):
    """The check before training looks at a few images (first, middle, last: all 28x28 here); another size met in a
    batch is the same clear error, from a worker too."""
    sized_folder(tmp_path / "train", [(28, 28)] * 3 + [(30, 30)] + [(28, 28)] * 12)
    cfg = digits_cfg(tmp_path, *NO_RESIZE, "task.val_split={root:" + str(tmp_path / "train") + "}",
                     f"data.workers={workers}", "trainer.max_steps=2")
    with pytest.raises(ConfigError, match=r"task.train_transform gives images of different sizes in one batch: "
                                          r"\(3, 28, 28\), \(3, 30, 30\); .*RandomResizedCrop"):
        run(cfg, tmp_path / "run")


# -- a broken image met mid-run; a resume on other data ------------------------------------------------------------
def test_a_bad_image_mid_run_says_how_to_resume_and_a_resume_on_other_data_is_refused(digit_folder, tmp_path):
    """The image of step 3's batch is broken: the run stops there with the resume command (checkpoints at steps 1
    and 2); removed as the message allows, the resume is refused (270 -> 269 training images, another validation
    split) unless accepted on purpose, which is recorded."""
    folder = tmp_path / "digits"
    shutil.copytree(digit_folder / "train", folder / "train")
    cfg = lambda *o: digits_cfg(folder, "trainer.checkpoint_interval=1", "trainer.eval_interval=0",  # noqa: E731
                                "trainer.max_steps=4", *o)
    parts = build(cfg())
    parts.batches.close()
    task = parts.task
    position = parts.sampler.indices(2).tolist()[0]  # step 3's first sample
    broken = Path(task.train_set.base.samples[task.train_set.indices[position]][0])
    broken.write_bytes(broken.read_bytes()[:40])
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as e:
        run(cfg(), run_dir)
    message = str(e.value)
    assert f"image {broken} could not be decoded" in message
    assert "trainer.resume_allow_data_changes=true" in message  # what removing the file does to a resumed run
    assert (f"Stopped at step 2; the last checkpoint is {run_dir / 'checkpoints' / 'step-00000002.pt'}. Once the data "
            "are fixed, resume with:\n  python ") in message
    assert message.endswith(f" trainer.resume={run_dir}")

    broken.unlink()
    with pytest.raises(ConfigError) as e:
        run(cfg(f"trainer.resume={run_dir}"), run_dir)
    message = str(e.value)
    assert f"trainer.resume={run_dir}: the checkpoint was written on other data" in message
    assert "  train.images: 270 -> 269\n" in message and "  val.files: " in message
    assert "trainer.resume_allow_data_changes=true" in message
    final = run(cfg(f"trainer.resume={run_dir}", "trainer.resume_allow_data_changes=true"), run_dir)
    assert final["step"] == 4
    changes = json.loads((run_dir / "manifest.json").read_text())["resumes"][-1]["changes"]
    assert changes["data:train.images"] == [270, 269]
