"""Locating data sets under the data root (`data.root=` or KILN_DATA_ROOT), with a clear error when missing."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.errors import DataNotFoundError

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def load_mnist(root: str | Path, download: bool | str = "auto") -> tuple[torch.Tensor, ...]:
    """MNIST as uint8 tensors: (train_images [60000,28,28], train_labels, test_images [10000,28,28], test_labels).

    Reads the IDX files torchvision expects at <root>/MNIST/raw/. `download`: True fetches them when missing,
    "auto" tries to and falls back to the error below, False never touches the network.
    """
    from torchvision.datasets import MNIST

    root = Path(root).expanduser()
    raw = root / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if missing and download in (True, "auto", "true"):
        try:
            MNIST(str(root), train=True, download=True)
            MNIST(str(root), train=False, download=True)
        except Exception as e:  # no network, mirror down, read-only disk ...
            reason = f" The download attempt failed: {type(e).__name__}: {e}."
        else:
            reason = ""
        missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    else:
        reason = ""
    if missing:
        raise DataNotFoundError(
            f"MNIST not found: looked for {', '.join(missing)} in {raw.resolve()}.{reason} "
            f"Fix: point the data root at the folder that contains MNIST/raw/, with `data.root=/path/to/data` "
            f"on the command line or `export KILN_DATA_ROOT=/path/to/data`; or, on a machine with internet, "
            f"run once with `data.download=true` to fetch it into {root.resolve()}."
        )
    train, test = MNIST(str(root), train=True, download=False), MNIST(str(root), train=False, download=False)
    return train.data, train.targets, test.data, test.targets


def holdout_split(n: int, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of n samples: the last `val_size` of a permutation drawn from its own
    generator (`seed`), so the split is the same for every run whatever trainer.seed is; the rest, in the
    permutation's order, train. val_size=0: everything trains, in file order. (MnistCNN draws the same split.)"""
    if val_size == 0:
        return torch.arange(n), torch.arange(0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:-val_size], perm[-val_size:]
