"""Variational autoencoder on MNIST (Kingma & Welling 1312.6114), the pytorch/examples baseline.

Model 784-400-(20, 20) / 20-400-784. Loss per image: Bernoulli reconstruction (BCE summed over the 784
pixels) + KL(q(z|x) || N(0, I)), so the test loss compares directly with the classic ~105.5 after
10 epochs of Adam 1e-3 at batch 128. Normalization (conf/norm) and dropout (regularize.dropout) go after
each hidden Linear.

Selection on validation, never on test: `val_size` training images (a permutation fixed by `split_seed`, not by
trainer.seed, so every run of every option sees the same split; tasks/data.py) are held out; evaluations report
their `val_loss`, which drives early stopping, plateau schedules and sweep tables, and the test set is scored once,
at the end (`final_metrics`). val_size=0 is pytorch/examples' setup: all 60000 images train and evaluations
report `test_loss` (recipe=mnist_vae_baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from core import figures
from core.task import Task
from tasks.data import holdout_split, load_mnist, mnist_train_size, root_problems, val_size_problems
from tasks.norm import norm_layer

NormFactory = Callable[[int], nn.Module]


class VAE(nn.Module):
    def __init__(self, hidden: int = 400, latent: int = 20, norm: NormFactory | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        norm = norm or (lambda n: norm_layer(n, "none"))

        def block(n_in: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(n_in, hidden), norm(hidden), nn.ReLU(), nn.Dropout(dropout))

        self.encoder = block(784)
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(block(latent), nn.Linear(hidden, 784))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of the 784 pixels."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation
        return self.decode(z), mu, logvar


def vae_loss(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-image negative ELBO: BCE summed over pixels + KL divergence to the unit Gaussian.

    BCE is taken from logits (numerically stable, and allowed under autocast, unlike F.binary_cross_entropy);
    half-precision inputs (autocast) are summed in float32.
    """
    logits, mu, logvar = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (logits, mu, logvar))
    bce = F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none").sum(1)
    kld = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return bce + kld


class MnistVAE(Task):
    check_evaluate_first = False  # tested against eval_metrics instead (tests/test_validate.py)
    eval_metrics = {"val_loss": "min"}
    test_metrics = {"test_loss": "min"}

    @classmethod
    def declared_metrics(cls, task: Mapping[str, Any]) -> tuple[Mapping[str, str], Mapping[str, str]]:
        if task.get("val_size", 5000) == 0:  # pytorch/examples' setup: evaluations score the test set
            return {"test_loss": "min"}, {}
        return cls.eval_metrics, cls.test_metrics

    @classmethod
    def train_size_of(cls, task: Mapping[str, Any]) -> int | None:
        return mnist_train_size(task["val_size"])

    @classmethod
    def check(cls, task: Mapping[str, Any]) -> list[str]:
        return super().check(task) + val_size_problems(task["val_size"], 0, "0: no validation split") + \
            root_problems("task.data_root", task.get("data_root"))

    def __init__(self, data_root: str, download: bool | str = "auto", batch_size: int = 128,
                 eval_batch_size: int = 1000, val_size: int = 5000, hidden: int = 400, latent: int = 20,
                 norm: NormFactory | None = None, dropout: float = 0.0, num_pictures: int = 8,
                 split_seed: int = 0) -> None:
        self.data_root, self.download = data_root, download
        self.batch_size, self.eval_batch_size, self.val_size = batch_size, eval_batch_size, val_size
        self.hidden, self.latent, self.norm, self.dropout = hidden, latent, norm, dropout
        self.num_pictures, self.split_seed = num_pictures, split_seed

    def setup(self, device: torch.device) -> None:
        train_x, train_y, test_x, test_y = load_mnist(self.data_root, self.download)
        train_x = train_x.reshape(len(train_x), 784)
        self.train_indices, self.val_indices = holdout_split(len(train_x), self.val_size, self.split_seed)
        # uint8 on the device (47 MB for the train set); scaled to [0, 1] per batch.
        self.train_x = train_x[self.train_indices].to(device)
        self.val_x, self.val_y = train_x[self.val_indices].to(device), train_y[self.val_indices].to(device)
        self.test_x = test_x.reshape(len(test_x), 784).to(device)
        self.test_y = test_y.to(device)
        self.device = device

    @property
    def eval_split(self) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(name, images, labels) that evaluations score: the validation split, or the test set without one."""
        return ("val", self.val_x, self.val_y) if self.val_size else ("test", self.test_x, self.test_y)

    def build_model(self) -> nn.Module:
        return VAE(self.hidden, self.latent, self.norm, self.dropout)

    @property
    def train_size(self) -> int:
        return len(self.train_x)

    def train_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.train_x[indices].float().div_(255)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits, mu, logvar = model(batch)
        return vae_loss(logits, batch, mu, logvar)

    @torch.no_grad()
    def _mean_loss(self, model: nn.Module, images: torch.Tensor) -> float:
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for i in range(0, len(images), self.eval_batch_size):
            x = images[i : i + self.eval_batch_size].float().div_(255)
            total += self.loss(model, x).sum(dtype=torch.float64)
        return total.item() / len(images)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        name, images, _ = self.eval_split
        return {f"{name}_loss": self._mean_loss(model, images)}

    def final_metrics(self, model: nn.Module) -> dict[str, float]:
        """The test set, scored once with the final (or restored best) weights; without a validation split the
        evaluations score it already."""
        return {"test_loss": self._mean_loss(model, self.test_x)} if self.val_size else {}

    @torch.no_grad()
    def latents(self, model: nn.Module) -> torch.Tensor:
        """Posterior means of the whole evaluation split, [n, latent]."""
        vae = getattr(model, "module", model)
        images = self.eval_split[1]
        chunks = [vae.encode(images[i : i + self.eval_batch_size].float().div_(255))[0]
                  for i in range(0, len(images), self.eval_batch_size)]
        return torch.cat(chunks)

    @torch.no_grad()
    def pictures(self, model: nn.Module, writer: SummaryWriter, step: int) -> None:
        vae = getattr(model, "module", model)
        n = self.num_pictures
        name, images, labels = self.eval_split
        x = images[:n].float().div_(255)
        recon = torch.sigmoid(vae.decode(vae.encode(x)[0]))
        writer.add_images("vae/reconstructions", torch.cat([x, recon]).reshape(-1, 1, 28, 28).cpu(), step)
        g = torch.Generator(device=self.device).manual_seed(0)  # the same prior draws at every eval
        z = torch.randn(n * n, self.latent, device=self.device, generator=g)
        writer.add_images("vae/samples", torch.sigmoid(vae.decode(z)).reshape(-1, 1, 28, 28).cpu(), step)
        figures.add_figure(writer, "vae/latent_space", latent_figure(self.latents(model), labels, name), step)

    def save_pictures(self, model: nn.Module, folder: Path) -> None:
        """The final latent-space scatter as a PNG in the run directory."""
        name, _, labels = self.eval_split
        figures.save(latent_figure(self.latents(model), labels, name), folder / "latent_space.png", dpi=120)


def principal_components(z: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Project rows of z onto their first k principal components (z itself when it has <= k dims)."""
    if z.shape[1] <= k:
        return z
    z = z.double() - z.double().mean(0)
    _, _, v = torch.linalg.svd(z, full_matrices=False)
    return (z @ v[:k].T).float()


def latent_figure(z: torch.Tensor, labels: torch.Tensor, split: str = "test"):
    """Scatter of a split's latent codes coloured by digit; rounder clusters mean a lower KL."""
    xy = principal_components(z.float().cpu()).numpy()
    fig, ax = figures.subplots(figsize=(6, 5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=2, alpha=0.7)
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    pcs = "first two principal components" if z.shape[1] > 2 else "latent dimensions"
    ax.set_title(f"{'validation' if split == 'val' else 'test'}-set latent means ({pcs} of {z.shape[1]})")
    return fig
