"""Locating data sets under the data root (`data.root=` or KILN_DATA_ROOT), with a clear error when missing,
and checking MNIST's files before they are read: a file cut short, an HTML error page saved under the name, a
file still gzip-compressed all get a message naming the file and the fix (torchvision's reader would fail with
a bare AssertionError or a reshape error, or read a wrong file without complaint).
"""

from __future__ import annotations

import struct
from math import prod
from pathlib import Path

import torch

from core.errors import DataError, DataNotFoundError

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
# What each file holds (LeCun's IDX format: magic 00 00 <type> <ndim>, big-endian sizes, then the values).
_IMAGE = (28, 28)
MNIST_TRAIN = 60000  # training images (the config checker derives steps per epoch from it)
_SETS = {"train": ("training set", MNIST_TRAIN), "t10k": ("test set", 10000)}


def mnist_train_size(val_size: object) -> int | None:
    """The MNIST training images left after a validation split of `val_size` (None: not a valid split)."""
    return MNIST_TRAIN - val_size if isinstance(val_size, int) and 0 <= val_size < MNIST_TRAIN else None


def root_problems(key: str, root: object) -> list[str]:
    """A data root that names a file, not a folder (a missing one is reported when the data are read)."""
    if isinstance(root, str) and root and Path(root).expanduser().exists() and not Path(root).expanduser().is_dir():
        return [f"{key}={root!r}: is a file, not a folder; point {key} at the folder that holds MNIST/raw/ and "
                "tinyshakespeare/ (data.root=/path/to/data or export KILN_DATA_ROOT=/path/to/data)"]
    return []


def val_size_problems(val_size: object, smallest: int, why: str) -> list[str]:
    """task.val_size's rule for an MNIST task: an int in [smallest, MNIST_TRAIN - 1]."""
    if isinstance(val_size, int) and not isinstance(val_size, bool) and smallest <= val_size < MNIST_TRAIN:
        return []
    return [f"task.val_size={val_size!r}: must be an int in [{smallest}, {MNIST_TRAIN - 1}] ({why})"]
_IDX_TYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


def load_mnist(root: str | Path, download: bool | str = "auto") -> tuple[torch.Tensor, ...]:
    """MNIST as uint8 tensors: (train_images [60000,28,28], train_labels, test_images [10000,28,28], test_labels).

    Reads the IDX files torchvision expects at <root>/MNIST/raw/. `download`: True fetches them when missing,
    "auto" tries to and falls back to the error below, False never touches the network. A file that is there
    but spoilt is never fetched again silently: DataError says which and how to replace it.
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
    return tuple(_read_idx(raw / name, root) for name in MNIST_FILES)


def _read_idx(path: Path, root: Path) -> torch.Tensor:
    """One MNIST file, checked against what it must hold, then read by torchvision's reader."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images = "images" in path.name
    what = "images" if images else "labels"
    split, count = _SETS[path.name.split("-")[0]]

    def bad(why: str) -> DataError:
        return DataError(f"MNIST file {path} {why}. Fix: delete it and run once with data.download=true to fetch "
                         f"a fresh copy into {root}, or point data.root=/path/to/data (or KILN_DATA_ROOT) at a "
                         f"folder with an intact MNIST/raw/.")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    ndim = 3 if images else 1
    header = 4 + 4 * ndim
    if size == 0:
        raise bad("is empty (0 bytes): an interrupted download?")
    if head[:2] == b"\x1f\x8b":
        raise bad("is still gzip-compressed (it starts with gzip's 1f 8b): gunzip it, e.g. "
                  f"`gunzip -c {path.name}.gz > {path.name}`")
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES or head[3] != ndim:
        raise bad(f"is not an MNIST IDX file: it starts with {head[:4].hex(' ')} where MNIST {what} files start "
                  f"with 00 00 08 0{ndim} (an error page saved under its name?)")
    if head[2] != 0x08:
        raise bad(f"holds {_IDX_TYPES[head[2]]} values where MNIST's are uint8")
    if size < header:
        raise bad(f"is {size} bytes, shorter than its own {header}-byte header: truncated")
    shape = struct.unpack(f">{ndim}I", head[4:header])
    if images and tuple(shape[1:]) != _IMAGE:
        raise bad(f"holds {shape[1]}x{shape[2]} images where MNIST's are 28x28")
    if shape[0] != count:
        raise bad(f"holds {shape[0]:,} {what} where MNIST's {split} has {count:,}")
    need, have = prod(shape), size - header
    described = f"{shape[0]:,} {what}" + (" of 28x28" if images else "")
    if have < need:
        raise bad(f"holds {have:,} bytes of {'pixels' if images else 'labels'} where its header ({described}) "
                  f"needs {need:,}: it is truncated (an interrupted download or copy)")
    if have > need:
        raise bad(f"holds {have - need:,} bytes more than its header ({described}) says: it is corrupt")
    try:
        data = (read_image_file if images else read_label_file)(str(path))
    except Exception as e:  # checked above; anything left is corruption the header does not show
        raise bad(f"could not be read ({type(e).__name__}: {e})") from None
    if not images and len(data) and int(data.max()) > 9:
        i = int(torch.argmax((data > 9).to(torch.uint8)))
        raise bad(f"holds label {int(data[i])} at position {i:,}; MNIST labels are 0-9: it is corrupt")
    return data


def holdout_split(n: int, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of n samples: the last `val_size` of a permutation drawn from its own
    generator (`seed`), so the split is the same for every run whatever trainer.seed is; the rest, in the
    permutation's order, train. val_size=0: everything trains, in file order. (MnistCNN draws the same split.)"""
    if val_size == 0:
        return torch.arange(n), torch.arange(0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:-val_size], perm[-val_size:]
