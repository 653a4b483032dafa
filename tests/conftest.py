"""Shared test helpers: independent dense K-FAC references and small models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mlp(widths: list[int], bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def small_cnn(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 5, kernel_size=3, padding=1, stride=1, bias=bias),
        nn.ReLU(),
        nn.Conv2d(5, 4, kernel_size=3, padding=2, stride=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6, bias=bias),
    )
