"""The VAE baseline recipe (recipes/mnist_vae_baseline.yaml) as a plain PyTorch loop: the reference for what the
trainer costs over a whole run (bench/peer.py runs both).

    python bench/plain_vae.py [--epochs 10] [--data-root DIR]

Adam 1e-3, batch 128, constant LR, the test loss after every epoch (what the recipe evaluates), nothing else: no
checkpoints, pictures, histograms or logs. It draws what the trainer draws (the same seeded permutation per epoch,
the same initialisation, evaluation on a forked RNG seeded with seed + 1), so it ends on the recipe's test loss:
the work is the same, only the loop differs. Plain torch but for the data tensors, the model class and the loss.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.data import load_mnist  # noqa: E402
from tasks.mnist_vae import VAE, vae_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=os.environ.get("KILN_DATA_ROOT", "data"))
    args = ap.parse_args()
    start = time.perf_counter()
    seed, batch = args.seed, 128
    train_x, _, test_x, _ = load_mnist(args.data_root, download=False)
    train_x, test_x = train_x.reshape(-1, 784), test_x.reshape(-1, 784)
    torch.manual_seed(seed)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    per_epoch = len(train_x) // batch
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in range(per_epoch):
            x = train_x[perm[i * batch : (i + 1) * batch]].float().div_(255)
            logits, mu, logvar = model(x)
            loss = vae_loss(logits, x, mu, logvar).sum() / batch
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed + 1)
            total = torch.zeros((), dtype=torch.float64)
            for j in range(0, len(test_x), 1000):
                x = test_x[j : j + 1000].float().div_(255)
                logits, mu, logvar = model(x)
                total += vae_loss(logits, x, mu, logvar).sum(dtype=torch.float64)
        model.train()
        print(f"epoch {epoch + 1}: train loss {loss.item():.3f}, test loss {total.item() / len(test_x):.4f}",
              flush=True)
    print(f"plain loop: {args.epochs} epochs in {time.perf_counter() - start:.1f} s, "
          f"test_loss {total.item() / len(test_x):.4f}")


if __name__ == "__main__":
    main()
