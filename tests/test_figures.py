"""Every figure kiln writes keeps its titles, labels, tick labels and legends inside the image, at a readable size.

Each figure is rendered from tiny inputs (no training): the run pictures (files and TensorBoard), the LR plot of
`python -m experiments.schedule_plot` and compare's report figures. Every text the renderer draws is measured by that
renderer, in the pixels of the image it writes, so a text cut off at the edge of the PNG fails here.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace as NS

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from core import figures
from experiments import schedule_plot
from experiments.compare import figures as compare_figures
from tasks.image_classification import ImageClassification
from tasks.mnist_vae import MnistVAE
from tests.conftest import ROOT

matplotlib.use("Agg")
MIN_PIXELS = 9  # the smallest text height we call readable: 7 pt at 100 dpi is 9.7 px


@dataclass
class Image:
    """The texts one renderer drew into one image, with that image's size in pixels."""

    width: int = 0
    height: int = 0
    renderer: int = 0
    texts: dict[int, tuple[str, Bbox, float, bool]] = field(default_factory=dict)  # id -> text, box, px, straight
    png: tuple[int, int] | None = None  # (width, height) read back from the file written

    def problems(self) -> list[str]:
        found = []
        texts = list(self.texts.values())
        for i, (text, box, px, straight) in enumerate(texts):
            name = _short(text)
            if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > self.width + 0.5 or box.y1 > self.height + 0.5:
                found.append(f"{name} spans x {box.x0:.0f}..{box.x1:.0f}, y {box.y0:.0f}..{box.y1:.0f}: outside "
                             f"the {self.width}x{self.height} image")
            if px < MIN_PIXELS:
                found.append(f"{name} is {px:.1f} px high (< {MIN_PIXELS})")
            for other, box2, _, straight2 in texts[i + 1:]:  # a tilted text's box is larger than its letters
                w = min(box.x1, box2.x1) - max(box.x0, box2.x0)
                h = min(box.y1, box2.y1) - max(box.y0, box2.y0)
                if straight and straight2 and w > 1 and h > 1:
                    found.append(f"{name} and {_short(other)} overlap ({w:.0f}x{h:.0f} px)")
        if self.png is not None and self.png != (self.width, self.height):
            found.append(f"the file is {self.png[0]}x{self.png[1]}, the texts were measured on "
                         f"{self.width}x{self.height}")
        return found


def _short(text: str) -> str:
    return repr(text if len(text) < 50 else text[:47] + "...")


@pytest.fixture
def drawn(monkeypatch) -> dict[str, Image]:
    """{image name: what was drawn into it} for every PNG saved (savefig) and every TensorBoard figure."""
    images: dict[str, Image] = {}
    current: list[str | None] = [None]
    text_draw, savefig, add_figure = Text.draw, Figure.savefig, SummaryWriter.add_figure

    def draw(self, renderer):
        text_draw(self, renderer)
        if current[0] is None or not self.get_visible() or not self.get_text().strip():
            return
        image = images.setdefault(current[0], Image())
        if image.renderer != id(renderer):  # a new draw of this image (savefig may draw more than once)
            image.renderer, image.width, image.height = id(renderer), *renderer.get_canvas_width_height()
            image.texts = {}
        image.texts[id(self)] = (self.get_text(), self.get_window_extent(renderer),
                                 self.get_fontsize() * renderer.dpi / 72, self.get_rotation() % 90 == 0)

    def save(self, fname, *args, **kwargs):
        current[0] = Path(fname).name
        try:
            savefig(self, fname, *args, **kwargs)
        finally:
            current[0] = None
        with open(fname, "rb") as f:  # the PNG header's IHDR chunk: width, height
            images[Path(fname).name].png = struct.unpack(">II", f.read(24)[16:24])

    def add(self, tag, figure, *args, **kwargs):
        current[0] = tag
        try:
            add_figure(self, tag, figure, *args, **kwargs)
        finally:
            current[0] = None

    monkeypatch.setattr(Text, "draw", draw)
    monkeypatch.setattr(Figure, "savefig", save)
    monkeypatch.setattr(SummaryWriter, "add_figure", add)
    return images


def assert_fit(drawn: dict[str, Image], names: set[str]) -> None:
    assert set(drawn) == names
    problems = [f"{name}: {p}" for name, image in sorted(drawn.items()) for p in image.problems()]
    assert not problems, "\n".join(problems)
    assert all(len(image.texts) >= 3 for image in drawn.values())  # titles, labels, ticks: the spy saw them


def test_the_latent_space_picture_fits(drawn, tmp_path):
    g = torch.Generator().manual_seed(0)
    task = MnistVAE(data_root=str(tmp_path), hidden=8, latent=20, num_pictures=2, eval_batch_size=16, val_size=40)
    task.device = torch.device("cpu")
    task.val_x, task.val_y = torch.randint(0, 256, (40, 784), dtype=torch.uint8, generator=g), torch.arange(40) % 10
    model = task.build_model()
    task.save_pictures(model, tmp_path / "pictures")
    with SummaryWriter(tmp_path / "tb") as writer:
        task.pictures(model, writer, step=1)
    assert_fit(drawn, {"latent_space.png", "vae/latent_space"})


class Guess(nn.Module):
    """A classifier of `k` classes that ignores the image: predictions from a fixed table."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.arange(len(x)) * 7 % self.k, self.k).float()


def test_the_classification_pictures_fit(drawn, tmp_path):
    # ImageFolder sub-folders and ImageNet-style synonyms: class names far wider than a picture
    names = [f"{w} {i}" for i, w in enumerate(["tiger_shark_galeocerdo_cuvieri", "hammerhead", "great white shark",
                                               "electric ray, crampfish, numbfish, torpedo"] * 3)]
    k = len(names)
    task = ImageClassification(dataset={"_target_": "torchvision.datasets.ImageFolder"}, model={}, num_pictures=10,
                               mean=(0.5,) * 3, std=(0.25,) * 3)
    task.device, task.classes, task.num_classes = torch.device("cpu"), names, k
    task._mean, task._std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    g = torch.Generator().manual_seed(0)
    task.val_set = [(torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8, generator=g), i % k) for i in range(10)]
    task.confusion = torch.randint(0, 20, (k, k), generator=g)
    task.save_pictures(Guess(k), tmp_path / "pictures")  # TensorBoard's are the same figures, fitted the same way
    assert_fit(drawn, {"predictions.png", "confusion_matrix.png"})


def test_the_lr_plot_fits(drawn, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_DATA_ROOT", str(tmp_path / "no-data-here"))  # the longest title: metric-driven
    schedule_plot.main(["schedule=plateau", "trainer.max_steps=60", f"out={tmp_path / 'lr.png'}"])
    assert_fit(drawn, {"lr.png"})


def compare_inputs(labels: list[str], axis: str, metric: str, mode: str):
    """What compare's report hands figures.draw, for a 3-seed comparison of `labels` with tuning and a target."""
    seeds, steps = [0, 1, 2], [0, 10, 20, 30, 40]
    plan = NS(options=[NS(label=x) for x in labels], metric=metric, mode=mode, axis=axis, rungs=[5, 15, 45],
              seeds=seeds)
    curves = {x: {s: NS(steps=steps, values=[2.0 / (1 + t * (i + 1 + s) / 40) for t in steps]) for s in seeds}
              for i, x in enumerate(labels)}
    rows = [NS(option=x, per_seed={s: 0.5 + 0.1 * i + 0.01 * s for s in seeds},
               val=NS(n=3, mean=0.5 + 0.1 * i, low=0.45 + 0.1 * i, high=0.55 + 0.1 * i),
               hits={s: NS(seconds=1.0 + i + s if s < 2 else math.inf) for s in seeds}) for i, x in enumerate(labels)]
    a = NS(curves=curves, target=0.8, rows=rows, seconds_source="time/train_s")
    tuning = {x: NS(trials={(0, p): NS(value=None if p == 4 else 1.0 + abs(p - 2) * 0.2 + 0.1 * i,
                                       trial=NS(lr=10.0 ** (p - 4), steps=5)) for p in range(5)}, chosen=2)
              for i, x in enumerate(labels)}
    finals = {x: [] for x in labels}
    return plan, a, tuning, finals


def test_the_compare_figures_fit(drawn, tmp_path):
    labels = ["cosine_warmup", "warmup_linear", "inverse_sqrt", "wsd", "plateau", "sgdr_with_restarts_every_epoch"]
    inputs = compare_inputs(labels, "schedule_with_a_long_key.name", "val_perplexity_per_token", "min")
    written = compare_figures.draw(tmp_path, *inputs)
    names = {"learning_curves.png", "lr_sensitivity.png", "final_per_seed.png", "time_to_target.png"}
    assert set(written.values()) == names
    assert_fit(drawn, names)


def test_every_figure_is_made_and_written_through_core_figures():
    """So that a new figure gets the same guarantee: no figure made, saved or logged around the helper."""
    around = re.compile(r"plt\.(subplots|figure)\(|tight_layout|(?<!figures)\.(savefig|add_figure)\(")
    sources = [p for p in ROOT.rglob("*.py") if not {"tests", ".venv", "runs", "outputs", "multirun"} & set(
        p.relative_to(ROOT).parts) and p != ROOT / "core" / "figures.py"]
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sources
             for i, line in enumerate(p.read_text().splitlines(), 1) if around.search(line)]
    assert len(sources) > 50 and not found, "\n".join(found)


def test_fit_wraps_a_long_title_and_grows_a_figure_too_small_for_its_labels(drawn, tmp_path):
    fig, ax = figures.subplots(figsize=(2.5, 2))
    ax.plot([0, 1, 2], [0, 1, 2])
    ax.set_yticks(range(3), [f"a category name wider than the figure, number {i}" for i in range(3)])
    title = "a title much longer than this small figure is wide, to be wrapped onto lines"
    ax.set_title(title)
    figures.save(fig, tmp_path / "small.png", dpi=100)
    assert_fit(drawn, {"small.png"})
    assert ax.get_title().replace("\n", " ") == title and ax.get_title().count("\n") >= 1
    assert fig.get_size_inches()[0] > 4  # the tick labels alone are wider than 2.5 inches
