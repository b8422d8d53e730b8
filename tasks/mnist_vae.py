"""Variational autoencoder on MNIST (Kingma & Welling 1312.6114), the pytorch/examples baseline.

Model 784-400-(20, 20) / 20-400-784. Loss per image: Bernoulli reconstruction (BCE summed over the 784
pixels) + KL(q(z|x) || N(0, I)), so the test loss compares directly with the classic ~105.5 after
10 epochs of Adam 1e-3 at batch 128. Normalization (conf/norm) and dropout (regularize.dropout) go after
each hidden Linear.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tasks.base import Task
from tasks.data import load_mnist
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
    eval_metrics = {"test_loss": "min"}

    def __init__(self, data_root: str, download: bool | str = "auto", batch_size: int = 128,
                 eval_batch_size: int = 1000, hidden: int = 400, latent: int = 20,
                 norm: NormFactory | None = None, dropout: float = 0.0, num_pictures: int = 8) -> None:
        self.data_root, self.download = data_root, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.hidden, self.latent, self.norm, self.dropout = hidden, latent, norm, dropout
        self.num_pictures = num_pictures

    def setup(self, device: torch.device) -> None:
        train_x, _, test_x, test_y = load_mnist(self.data_root, self.download)
        # uint8 on the device (47 MB for the train set); scaled to [0, 1] per batch.
        self.train_x = train_x.reshape(len(train_x), 784).to(device)
        self.test_x = test_x.reshape(len(test_x), 784).to(device)
        self.test_y = test_y.to(device)
        self.device = device

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
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for i in range(0, len(self.test_x), self.eval_batch_size):
            x = self.test_x[i : i + self.eval_batch_size].float().div_(255)
            total += self.loss(model, x).sum(dtype=torch.float64)
        return {"test_loss": total.item() / len(self.test_x)}

    @torch.no_grad()
    def latents(self, model: nn.Module) -> torch.Tensor:
        """Posterior means of the whole test set, [10000, latent]."""
        vae = getattr(model, "module", model)
        chunks = [vae.encode(self.test_x[i : i + self.eval_batch_size].float().div_(255))[0]
                  for i in range(0, len(self.test_x), self.eval_batch_size)]
        return torch.cat(chunks)

    @torch.no_grad()
    def pictures(self, model: nn.Module, writer: SummaryWriter, step: int) -> None:
        vae = getattr(model, "module", model)
        n = self.num_pictures
        x = self.test_x[:n].float().div_(255)
        recon = torch.sigmoid(vae.decode(vae.encode(x)[0]))
        writer.add_images("vae/reconstructions", torch.cat([x, recon]).reshape(-1, 1, 28, 28).cpu(), step)
        g = torch.Generator(device=self.device).manual_seed(0)  # the same prior draws at every eval
        z = torch.randn(n * n, self.latent, device=self.device, generator=g)
        writer.add_images("vae/samples", torch.sigmoid(vae.decode(z)).reshape(-1, 1, 28, 28).cpu(), step)
        writer.add_figure("vae/latent_space", latent_figure(self.latents(model), self.test_y), step)

    def save_pictures(self, model: nn.Module, folder: Path) -> None:
        """The final latent-space scatter as a PNG in the run directory."""
        import matplotlib.pyplot as plt

        fig = latent_figure(self.latents(model), self.test_y)
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / "latent_space.png", dpi=120)
        plt.close(fig)


def principal_components(z: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Project rows of z onto their first k principal components (z itself when it has <= k dims)."""
    if z.shape[1] <= k:
        return z
    z = z.double() - z.double().mean(0)
    _, _, v = torch.linalg.svd(z, full_matrices=False)
    return (z @ v[:k].T).float()


def latent_figure(z: torch.Tensor, labels: torch.Tensor):
    """Scatter of the test set's latent codes coloured by digit; rounder clusters mean a lower KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = principal_components(z.float().cpu()).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=2, alpha=0.7)
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    pcs = "first two principal components" if z.shape[1] > 2 else "latent dimensions"
    ax.set_title(f"test-set latent means ({pcs} of {z.shape[1]})")
    fig.tight_layout()
    return fig
