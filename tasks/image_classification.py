"""Image classification with any torchvision data set class or ImageFolder and any torchvision model.

Everything comes from config (conf/task/image_classification.yaml):

- `dataset`: the training split, a `_target_` node built without a transform (torchvision.datasets.ImageFolder,
  CIFAR10, MNIST, ...). `val_split` / `test_split` are keyword overrides of that node for other splits (`{train:
  false}` for CIFAR10, `{root: /data/pets/val}` for folders, `{split: test}` for Food101); without `val_split` a
  validation split of `val_fraction` is carved out of the training split (a seeded permutation: `split_seed`).
  Other splits are labelled by the training split's class names (a folder lacking a class is noted; one with a class
  the training split lacks is refused).
- `train_transform` / `eval_transform`: lists of torchvision.transforms.v2 transforms, applied to each image inside
  the loader's workers after ToImage (PIL -> uint8 tensor). Their randomness is seeded per sample by the trainer
  (core/batches.py), so augmentation is the same for any number of workers and survives resume exactly. Batches
  travel as uint8 (a quarter of float32's bytes) and are scaled to [0, 1] and normalised (mean, std) on the device.
- `image_size`: the height and width the default transforms crop to (checked on one evaluation image).
- `model`: any callable taking torchvision's builder arguments: `num_classes` (always set), `norm_layer` (set when a
  norm is chosen: norm=batchnorm|layernorm|rmsnorm|none; norm=model, this task's default, keeps the model's own) and
  `dropout` (regularize.dropout, set for models that take it, so 0 turns off e.g. EfficientNet's 0.2). A model that
  cannot take the chosen norm or a non-zero dropout is a config error, never a silently ignored choice.

Metrics: val_loss and val_acc (the monitor) at each evaluation; test_loss and test_acc once at the end when a test
split is given. Pictures: validation images with predicted and true labels, and the confusion matrix.

Images that fail to decode stop the run by default, naming the file (task.bad_images=error): a data set with broken
files is a data problem to fix, and dropping samples while training would change batch shapes and the sample
order that exact resume relies on. task.bad_images=skip decodes every image once at setup and leaves out the ones
that fail, with their count and names.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import Dataset, default_collate
from torch.utils.tensorboard import SummaryWriter

from core import figures
from core.batches import DataLoading
from core.errors import BadSampleError, ConfigError, DataError, DataNotFoundError, UserError
from core.log import print_warning
from core.task import Task

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BadImageError(BadSampleError):
    """An image in the data set could not be decoded (task.bad_images=error)."""


def decode_errors() -> tuple[type[BaseException], ...]:
    """What a broken image file raises: OSError (PIL's UnidentifiedImageError, truncated files), SyntaxError
    (corrupt PNG chunks), DecompressionBombError."""
    from PIL import Image

    return OSError, SyntaxError, Image.DecompressionBombError


class SmallCNN(nn.Module):
    """A small convnet with torchvision's builder arguments (num_classes, norm_layer, dropout), fast on a CPU: the
    default model. conv3x3(w) - norm - ReLU - conv3x3/2(2w) - norm - ReLU - conv3x3/2(4w) - norm - ReLU - global
    average pool - dropout - linear. Any input size works."""

    def __init__(self, num_classes: int = 1000, norm_layer: Any = None, dropout: float = 0.0, width: int = 32,
                 in_channels: int = 3) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        layers: list[nn.Module] = []
        for c_in, c_out, stride in [(in_channels, width, 1), (width, 2 * width, 2), (2 * width, 4 * width, 2)]:
            norm = norm_layer(c_out)
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=isinstance(norm, nn.Identity)), norm, nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class NormFactory:
    """torchvision's `norm_layer(num_channels)` made from the configured norm (the channel axis found per input)."""

    def __init__(self, norm: Any) -> None:
        self.norm = norm

    def __call__(self, num_features: int, *args: Any, **kwargs: Any) -> nn.Module:
        return self.norm(num_features, spatial="auto")


def logits_of(output: Any) -> torch.Tensor:
    """The class scores of a model's output (GoogLeNet and Inception return auxiliary outputs while training)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def pipeline(items: Sequence[Any], key: str) -> Any:
    """ToImage, then the configured v2 transforms."""
    from torchvision.transforms import v2

    made = []
    for i, node in enumerate(items or []):
        try:
            made.append(instantiate(node))
        except Exception as e:
            cause = e.__cause__ or e
            target = node.get("_target_") if isinstance(node, Mapping) else node
            raise ConfigError(f"{key}[{i}] ({target}): {type(cause).__name__}: {cause}") from None
    return v2.Compose([v2.ToImage(), *made])


def describe(base: Any, index: int) -> str:
    samples = getattr(base, "samples", None)  # ImageFolder / DatasetFolder: (path, class) pairs
    return f"image {samples[index][0]}" if samples is not None else f"sample {index}"


def names(items: Sequence[Any], at_most: int = 10) -> str:
    shown = ", ".join(map(str, items[:at_most]))
    return shown + (f", ... ({len(items)} in all)" if len(items) > at_most else "")


def one_size_hint(key: str) -> str:
    crop = ("{_target_: torchvision.transforms.v2.RandomResizedCrop, size: N}" if key == "task.train_transform" else
            "{_target_: torchvision.transforms.v2.Resize, size: N}, {_target_: torchvision.transforms.v2.CenterCrop, "
            "size: N}")
    return (f"a batch stacks images of one size: make {key} end with a fixed-size crop, e.g. {crop} (as the "
            "default transforms do, with N = task.image_size)")


class Stack:
    """default_collate, naming the transform to fix where it leaves images of different sizes in a batch."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> Any:
        try:
            return default_collate(samples)
        except RuntimeError:
            shapes = sorted({tuple(s[0].shape) for s in samples})
            if len(shapes) < 2:
                raise
            raise ConfigError(f"{self.key} gives images of different sizes in one batch: {names(shapes)}; "
                              + one_size_hint(self.key)) from None


class Split(Dataset):
    """Samples `indices` of a base data set, each image transformed; one that fails to decode names its file.
    `label_map`: the training split's class index of each of the base's labels (None: the same numbering)."""

    def __init__(self, base: Any, indices: Sequence[int], transform: Any, key: str,
                 label_map: Sequence[int] | None = None) -> None:
        self.base, self.indices, self.transform, self.key = base, list(indices), transform, key
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        try:
            image, label = self.base[j]
        except decode_errors() as e:
            raise BadImageError(
                f"{self.key}: {describe(self.base, j)} could not be decoded ({type(e).__name__}: {e}). Fix or remove "
                "the file, or set task.bad_images=skip to leave out every image that fails to decode (each image "
                "is then decoded once at setup to find them). Each changes the data: a run resumed on them "
                "continues on other data than it began with (removing or skipping a file changes the epoch length "
                "and, with task.val_fraction, the validation split), so the resume is refused unless "
                "trainer.resume_allow_data_changes=true; a fresh run is exact.") from None
        return self.transform(image), label if self.label_map is None else self.label_map[label]


class ImageClassification(Task):
    check_evaluate_first = False  # tested against eval_metrics instead (tests/test_validate.py)
    eval_metrics = {"val_loss": "min", "val_acc": "max"}

    @classmethod
    def declared_metrics(cls, task: Mapping[str, Any]) -> tuple[Mapping[str, str], Mapping[str, str]]:
        """The test split is scored only when task.test_split names one."""
        tests = {"test_loss": "min", "test_acc": "max"} if task.get("test_split") is not None else {}
        return cls.eval_metrics, tests

    @classmethod
    def check(cls, task: Mapping[str, Any]) -> list[str]:
        fraction, classes, size = task["val_fraction"], task["num_classes"], task["image_size"]
        return super().check(task) + [line for ok, line in [
            (type(fraction) in (int, float) and 0 < fraction < 1, f"task.val_fraction={fraction!r}: must be a number "
                                                                  "in (0, 1)"),
            (classes is None or type(classes) is int and classes >= 2, f"task.num_classes={classes!r}: must be null "
                                                                       "or an int >= 2"),
            (size is None or type(size) is int and size >= 1, f"task.image_size={size!r}: must be null or an int >= 1"),
            (task["bad_images"] in ("error", "skip"), f"task.bad_images={task['bad_images']!r}: must be one of error, "
                                                      "skip")] if not ok]

    def __init__(self, dataset: Mapping[str, Any], model: Mapping[str, Any], val_split: Mapping[str, Any] | None = None,
                 val_fraction: float = 0.1, test_split: Mapping[str, Any] | None = None, num_classes: int | None = None,
                 image_size: int | None = None, train_transform: Sequence[Any] = (), eval_transform: Sequence[Any] = (),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, batch_size: int = 64,
                 eval_batch_size: int = 256, norm: Mapping[str, Any] | None = None, dropout: float = 0.0,
                 label_smoothing: float = 0.0, bad_images: str = "error", split_seed: int = 0,
                 num_pictures: int = 16) -> None:
        if bad_images not in ("error", "skip"):
            raise ConfigError(f"task.bad_images={bad_images!r}: use error or skip")
        if "transform" in dataset or "transforms" in dataset:
            raise ConfigError("task.dataset.transform: leave it out and set task.train_transform / "
                              "task.eval_transform (lists of torchvision.transforms.v2 transforms, applied per split)")
        self.dataset_cfg, self.model_cfg = dataset, model
        self.val_split, self.val_fraction, self.test_split = val_split, val_fraction, test_split
        self.num_classes, self.image_size = num_classes, image_size
        self.train_transform = pipeline(train_transform, "task.train_transform")
        self.eval_transform = pipeline(eval_transform, "task.eval_transform")
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.norm = instantiate(norm) if norm is not None else None  # None: norm=model, the model's own layers
        self.norm_kind = norm.get("kind", "?") if norm is not None else "model"
        self.dropout, self.label_smoothing = dropout, label_smoothing
        self.bad_images, self.split_seed, self.num_pictures = bad_images, split_seed, num_pictures
        self.confusion: torch.Tensor | None = None

    # -- data -------------------------------------------------------------------------------------------------
    def _dataset(self, key: str, overrides: Mapping[str, Any] | None) -> Any:
        """The base data set with `overrides` applied (a split), with clear errors for missing or empty data."""
        overrides = dict(overrides or {})
        target = self.dataset_cfg.get("_target_")
        root = overrides.get("root", self.dataset_cfg.get("root"))
        root_key = f"{key}.root" if "root" in overrides else "task.dataset.root"
        folder = "ImageFolder" in str(target)
        layout = (" ImageFolder wants one sub-folder per class, holding that class's images: "
                  "<root>/<class name>/<image>.png (or .jpg ...).") if folder else ""
        downloads = bool(overrides.get("download", self.dataset_cfg.get("download", False)))
        if root is not None and not downloads and not Path(str(root)).expanduser().exists():
            raise DataNotFoundError(f"{root_key}={root}: no such folder. Point {root_key} at the folder that holds "
                                    f"the data set.{layout}")
        try:
            base = instantiate(self.dataset_cfg, **overrides)
        except Exception as e:
            cause = e.__cause__ or e
            error = ConfigError if isinstance(cause, TypeError) else DataNotFoundError
            hint = (" To fetch it (where the data set class can): +task.dataset.download=true."
                    if "download" in str(cause) else layout)
            raise error(f"{key} ({target}, root={root}): {type(cause).__name__}: {cause}.{hint}") from None
        if len(base) == 0:
            raise DataNotFoundError(f"{key} ({target}, root={root}) holds no samples.{layout}")
        return base

    def _decodable(self, base: Any, indices: Sequence[int]) -> tuple[list[int], list[str]]:
        keep, bad = [], []
        for j in indices:
            try:
                base[j]
            except decode_errors():
                bad.append(describe(base, j))
            else:
                keep.append(j)
        return keep, bad

    def setup(self, device: torch.device) -> None:
        self.device = device
        base = self._dataset("task.dataset", None)
        n = len(base)
        if self.val_split is None:
            n_val = max(1, round(n * self.val_fraction))
            if n_val >= n:
                raise ConfigError(f"task.val_fraction={self.val_fraction}: leaves no training images (of {n})")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
            train_idx, val_base, val_idx = perm[:-n_val], base, perm[-n_val:]
        else:
            val_base = self._dataset("task.val_split", self.val_split)
            train_idx, val_idx = list(range(n)), list(range(len(val_base)))
        test_base = self._dataset("task.test_split", self.test_split) if self.test_split is not None else None
        test_idx = list(range(len(test_base))) if test_base is not None else []
        if self.bad_images == "skip":
            skipped = []
            train_idx, bad = self._decodable(base, train_idx)
            skipped += bad
            val_idx, bad = self._decodable(val_base, val_idx)
            skipped += bad
            if test_base is not None:
                test_idx, bad = self._decodable(test_base, test_idx)
                skipped += bad
            if skipped:

                print_warning(f"task.bad_images=skip: left out {len(skipped)} image(s) that fail to decode: "
                              + ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
            self.skipped_images = len(skipped)
        self.classes = getattr(base, "classes", None)
        if self.num_classes is None:
            if self.classes is None:
                raise ConfigError(f"task.num_classes=null: {self.dataset_cfg.get('_target_')} has no `classes` "
                                  "attribute to count them; set task.num_classes")
            self.num_classes = len(self.classes)
        elif self.classes is not None and len(self.classes) != self.num_classes:
            raise ConfigError(f"task.num_classes={self.num_classes}: the data set has {len(self.classes)} classes "
                              f"({', '.join(map(str, self.classes[:5]))}{', ...' if len(self.classes) > 5 else ''}); "
                              f"set task.num_classes={len(self.classes)} or null")
        if len(train_idx) < self.batch_size:
            raise ConfigError(f"task.batch_size={self.batch_size}: larger than the training split "
                              f"({len(train_idx)} images)")
        self.train_set = Split(base, train_idx, self.train_transform, "task.dataset")
        self.val_set = Split(val_base, val_idx, self.eval_transform,
                             "task.val_split" if self.val_split is not None else "task.dataset",
                             self._labels_by_name("task.val_split", self.val_split, val_base, base))
        self.test_set = (Split(test_base, test_idx, self.eval_transform, "task.test_split",
                               self._labels_by_name("task.test_split", self.test_split, test_base, base))
                         if test_base is not None else None)
        self._check_one_size(self.train_set, "task.train_transform")
        for split in (self.val_set, self.test_set):
            if split is not None:
                self._check_one_size(split, "task.eval_transform")
        self.collate = Stack("task.train_transform")  # the trainer's DataLoader collates training batches with it
        self.loading = self.loading or DataLoading(device)
        self.val_batches = self.loading.ordered(self.val_set, self.eval_batch_size, Stack("task.eval_transform"))
        self._mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        self.test_batches = (self.loading.ordered(self.test_set, self.eval_batch_size, Stack("task.eval_transform"))
                             if self.test_set else None)

    def _root(self, overrides: Mapping[str, Any] | None) -> Any:
        return (overrides or {}).get("root", self.dataset_cfg.get("root"))

    def _labels_by_name(self, key: str, overrides: Mapping[str, Any] | None, base: Any,
                        train: Any) -> list[int] | None:
        """The training split's class index of each of a split's labels, matched by class name: torchvision numbers
        each folder's classes on its own (sorted), so a validation folder without one class would shift every label
        after it. None where the classes agree; refused where the split has classes the training split lacks."""
        ours, theirs = getattr(train, "classes", None), getattr(base, "classes", None)
        if base is train or ours is None or theirs is None or list(ours) == list(theirs):
            return None
        index = {c: i for i, c in enumerate(ours)}
        extra = [c for c in theirs if c not in index]
        missing = [c for c in ours if c not in set(theirs)]
        where = f"{key} (root={self._root(overrides)})"
        lacks = f"class{'es' * (len(missing) > 1)} {names(missing)}"
        if extra:
            raise DataError(
                f"{where} has classes the training split (task.dataset.root={self._root(None)}) lacks: "
                f"{names(extra)}" + (f" (it also lacks {lacks})" if missing else "") + ". A model of the training "
                "split's classes cannot score them: give the split only class folders the training split has (the "
                "same names), or add those classes to the training split.")

        print_warning(f"{where} has no images of {lacks}; its labels follow the training split's classes by name.")
        return [index[c] for c in theirs]

    @staticmethod
    def _check_one_size(split: Split, key: str) -> None:
        """A batch stacks images of one size: a split's first, middle and last images must come out of its
        transform in one shape (photos of many sizes need a resizing crop). Batches check every image (Stack)."""
        n = len(split)
        if n == 0:
            return
        shapes: dict[tuple[int, ...], str] = {}
        with torch.random.fork_rng(devices=[]):
            for i in sorted({0, n // 2, n - 1}):
                shapes.setdefault(tuple(split[i][0].shape), describe(split.base, split.indices[i]))
        if len(shapes) > 1:
            raise ConfigError(f"{key} gives images of different sizes: "
                              + ", ".join(f"{s} for {w}" for s, w in shapes.items()) + "; " + one_size_hint(key))

    def train_dataset(self) -> Dataset:
        return self.train_set

    def data_fingerprint(self) -> dict[str, Any]:
        """Each split's image count and, for folder data sets, hashes of its file list in split order: the names
        (relative to the data set's root, so moving the data is no change) and their sizes, never the contents. A
        file added, removed or replaced, or another split (task.val_fraction, task.split_seed), shows."""
        out: dict[str, Any] = {}
        for name, split in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set)):
            if split is None:
                continue
            out[f"{name}.images"] = len(split)
            samples = getattr(split.base, "samples", None)  # ImageFolder / DatasetFolder: (path, class) pairs
            if samples is None:
                continue
            root = os.path.join(str(split.base.root), "")
            names, sizes = hashlib.sha256(), hashlib.sha256()
            for j in split.indices:
                path = samples[j][0]
                names.update(path.removeprefix(root).encode() + b"\0")
                try:
                    sizes.update(b"%d\0" % os.path.getsize(path))
                except OSError:  # gone since setup: counted as a change
                    sizes.update(b"-\0")
            out[f"{name}.files"], out[f"{name}.file_sizes"] = names.hexdigest()[:16], sizes.hexdigest()[:16]
        return out

    # -- model ------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        target = self.model_cfg.get("_target_")
        kwargs: dict[str, Any] = {"num_classes": self.num_classes, "dropout": self.dropout}
        if self.norm is not None:
            kwargs["norm_layer"] = NormFactory(self.norm)
        while True:
            try:
                model = instantiate(self.model_cfg, **kwargs)
                break
            except Exception as e:
                cause = e.__cause__ or e
                unknown = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
                name = unknown.group(1) if unknown else None
                if name == "dropout" and self.dropout == 0:
                    del kwargs["dropout"]  # the model has no dropout: 0 is what it has
                    continue
                raise ConfigError(self._model_error(target, name, cause)) from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"task.model._target_={target}: returned a {type(model).__name__}, not an nn.Module")
        self._check_output(model, target)
        return model

    def _model_error(self, target: str, name: str | None, cause: BaseException) -> str:
        if name == "dropout":
            return (f"regularize.dropout={self.dropout}: {target} takes no `dropout` argument, so its dropout cannot "
                    "be set; use regularize.dropout=0, or a model that takes one (torchvision's efficientnet_*, "
                    "mobilenet_v2/v3_*, vit_*, swin_*, vgg*, squeezenet*, densenet*)")
        if name == "norm_layer":
            return (f"norm={self.norm_kind}: {target} takes no `norm_layer` argument, so its normalization cannot be "
                    "replaced; use norm=model (its own layers), or a model that takes one (torchvision's resnet*, "
                    "resnext*, wide_resnet*, regnet_*, mobilenet_v2/v3_*, efficientnet_*, convnext_*, vit_*, swin_*)")
        if name == "num_classes":
            return (f"task.model._target_={target}: takes no `num_classes` argument; the task sets the class count "
                    "through it (torchvision's builder convention), so wrap the model in a function that takes it")
        return f"task.model ({target}): {type(cause).__name__}: {cause}"

    def _check_output(self, model: nn.Module, target: str) -> None:
        """One evaluation image through the fresh model: its output must be [1, num_classes]."""
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            try:
                image = self.val_set[0][0].unsqueeze(0)
            except UserError:
                raise
            except Exception as e:
                raise ConfigError(f"task.eval_transform fails on an image: {type(e).__name__}: {e}") from None
            try:
                x = self.normalize(image.to(self.device)).cpu()
            except Exception as e:
                raise ConfigError(f"task.mean={list(self.mean)}, task.std={list(self.std)}: do not fit the "
                                  f"{tuple(image.shape[1:])} images of task.eval_transform ({type(e).__name__}: {e}); "
                                  "give one value per channel") from None
            if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
                raise ConfigError(f"task.image_size={self.image_size}: task.eval_transform gives "
                                  f"{tuple(x.shape[-2:])} images; make the transforms crop to the image size (or set "
                                  "task.image_size=null to skip this check)")
            model.eval()
            try:
                out = logits_of(model(x))
            except Exception as e:
                raise ConfigError(f"task.model ({target}) fails on one {tuple(x.shape[1:])} image from "
                                  f"task.eval_transform: {type(e).__name__}: {e}. Check task.image_size and the "
                                  "transforms (e.g. inception_v3 needs 299x299 images)") from None
            finally:
                model.train()
        if out.shape != (1, self.num_classes):
            raise ConfigError(f"task.model ({target}) outputs shape {tuple(out.shape)} for one image, not "
                              f"[1, task.num_classes={self.num_classes}]: its classifier does not match the class "
                              "count (a model that ignores `num_classes`, or pretrained weights with another head)")

    # -- training and evaluation ------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (or floats in [0, 1]) on the device -> normalised float32."""
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return x.sub_(self._mean).div_(self._std)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = logits_of(model(self.normalize(x))).float()
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=self.label_smoothing)

    def _score(self, model: nn.Module, batches: Any, n: int, confusion: bool) -> tuple[float, float]:
        """Mean loss and accuracy over a split; accumulated on the device, read once."""
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        k = self.num_classes
        counts = torch.zeros(k * k, device=self.device, dtype=torch.long) if confusion else None
        for x, y in batches:
            logits = logits_of(model(self.normalize(x))).float()
            loss += F.cross_entropy(logits, y, reduction="sum").double()
            pred = logits.argmax(1)
            correct += (pred == y).sum()
            if counts is not None:
                counts += torch.bincount(y * k + pred, minlength=k * k)
        if counts is not None:
            self.confusion = counts.view(k, k).cpu()  # rows: true class, columns: predicted
        return loss.item() / n, correct.item() / n

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loss, acc = self._score(model, self.val_batches, len(self.val_set), confusion=self.num_classes <= 100)
        return {"val_loss": loss, "val_acc": acc}

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """The test split (task.test_split), scored once at the end with the final (or restored best) weights."""
        if self.test_batches is None:
            return {}
        loss, acc = self._score(model, self.test_batches, len(self.test_set), confusion=False)
        return {"test_loss": loss, "test_acc": acc}

    # -- pictures ---------------------------------------------------------------------------------------------
    def _label(self, c: int) -> str:
        return str(self.classes[c]) if self.classes is not None else str(c)

    @torch.no_grad()
    def _prediction_figure(self, model: nn.Module) -> Any:
        n = min(self.num_pictures, len(self.val_set))
        samples = [self.val_set[i] for i in range(n)]
        images = torch.stack([s[0] for s in samples])
        pred = logits_of(model(self.normalize(images.to(self.device)))).argmax(1).cpu()
        cols = min(8, n)
        rows = -(-n // cols)
        fig, axes = figures.subplots(rows, cols, figsize=(1.6 * cols, 2.1 * rows), squeeze=False)
        for ax in axes.flat:
            ax.set(xticks=[], yticks=[])  # no tick labels for the layout to measure: half its time
            ax.set_axis_off()
        for ax, image, (_, label), p in zip(axes.flat, images, samples, pred.tolist()):
            shown = (image.float() / 255 if image.dtype == torch.uint8 else image).clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown, cmap="gray")
            ax.set_title(f"{self._label(p)}\n(true {self._label(label)})", fontsize=7,
                         color="green" if p == label else "red")
        fig.suptitle("validation images: predicted (true)", fontsize=9)
        return fig

    def _confusion_figure(self) -> Any:
        counts = self.confusion.double()
        rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
        k = len(rates)
        fig, ax = figures.subplots(figsize=(min(12, 2 + 0.4 * k), min(11, 1.5 + 0.4 * k)))
        shown = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(shown, ax=ax, label="fraction of the true class")
        if k <= 30:
            names = [self._label(c) for c in range(k)]
            ax.set_xticks(range(k), names, rotation=90, fontsize=7)
            ax.set_yticks(range(k), names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("validation confusion matrix (rows sum to 1)")
        return fig

    def pictures(self, model: nn.Module, writer: SummaryWriter, step: int) -> None:
        if self.num_pictures:
            figures.add_figure(writer, "images/predictions", self._prediction_figure(model), step)
        if self.confusion is not None:
            figures.add_figure(writer, "images/confusion_matrix", self._confusion_figure(), step)

    def save_pictures(self, model: nn.Module, folder: Path) -> None:
        """The final predictions and confusion matrix as PNGs in the run directory."""
        model.eval()
        drawn = {"predictions": self._prediction_figure(model) if self.num_pictures else None,
                 "confusion_matrix": self._confusion_figure() if self.confusion is not None else None}
        model.train()
        for name, fig in drawn.items():
            if fig is not None:
                figures.save(fig, folder / f"{name}.png", dpi=120)
