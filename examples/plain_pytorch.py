"""Low-rank K-FAC in a plain PyTorch loop: no Lightning anywhere.

An MLP on sklearn's digits, trained with SGD + momentum; ``kfac.step`` goes between
``backward()`` and ``optimizer.step()``.

    python examples/plain_pytorch.py [--epochs 10]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_lrkfac import LowRankKFAC


def digits(seed: int = 0) -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """sklearn's 8×8 digits scaled to [0, 1], split 80 / 20 with a fixed seed."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return torch.utils.data.TensorDataset(x[train], y[train]), torch.utils.data.TensorDataset(x[test], y[test])


def main(epochs: int = 10) -> float:
    torch.manual_seed(0)
    train, test = digits()
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with LowRankKFAC(model, rank=16, damping=1e-2, isotropic_tail=True) as kfac:
        for _ in range(epochs):
            for x, y in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                kfac.step(lr=optimizer)  # the KL clip uses each parameter group's learning rate
                optimizer.step()
    print(kfac.coverage_report())
    with torch.no_grad():
        x, y = test.tensors
        accuracy = float((model(x).argmax(-1) == y).float().mean())
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    main(parser.parse_args().epochs)
