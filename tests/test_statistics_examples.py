"""``statistics_examples``: the factors come from a slice of each batch's examples, made per-example by the whole
batch's multiplier, and equal dense K-FAC built by hand from those examples' rows (exact mode, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFAC
from lightning_lrkfac.options import KFACOptions

from .helpers import damped_natural, with_ones

BATCH, POSITIONS, WIDTH, CLASSES, DAMPING = 8, 5, 6, 4, 1e-2


class SequenceNet(nn.Module):
    """A Linear over (batch, positions, features): every position a row of its statistics (K-FAC-expand)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(WIDTH, 7)
        self.head = nn.Linear(7, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def sequence_loss(model, x, y):
    return F.cross_entropy(model(x).reshape(-1, CLASSES), y.reshape(-1))


class ImageNet(nn.Module):
    """A Conv2d (its dense A from patch Grams, every location a row of its statistics) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).flatten(1))


def image_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def reference_rows(model, x, y, loss_fn, kept: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body layer's A-rows (with the ones column) and per-example B-rows of the kept examples, by hand, and its
    [W b] gradient of the whole batch's loss."""
    out = {}
    handle = model.body.register_forward_hook(lambda module, args, output: out.update(x=args[0], s=output))
    loss = loss_fn(model, x, y)
    handle.remove()
    (grad,) = torch.autograd.grad(loss, out["s"], retain_graph=True)
    weight, bias = torch.autograd.grad(loss, [model.body.weight, model.body.bias])
    gradient = torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], 1)
    if isinstance(model.body, nn.Conv2d):
        patches = F.unfold(x[kept], 3, padding=1).transpose(1, 2).reshape(-1, weight[0].numel())
        b_rows = grad[kept].movedim(1, -1).reshape(-1, weight.shape[0]) * BATCH  # B sums over locations
        return with_ones(patches), b_rows, gradient
    a_rows = out["x"][kept].reshape(-1, WIDTH)
    b_rows = grad[kept].reshape(-1, grad.shape[-1]) * BATCH * POSITIONS  # the loss averaged over every token
    return with_ones(a_rows), b_rows, gradient


CASES = {
    "linear-on-sequences": (
        SequenceNet,
        lambda: torch.randn(BATCH, POSITIONS, WIDTH),
        (BATCH, POSITIONS),
        sequence_loss,
    ),
    "conv2d": (ImageNet, lambda: torch.randn(BATCH, 2, 4, 4), (BATCH,), image_loss),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("keep", [4, 3])
def test_factors_come_from_a_slice_of_the_examples(case, keep):
    network, inputs, label_shape, loss_fn = CASES[case]
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model, x, y = network(), inputs(), torch.randint(0, CLASSES, label_shape)
        options = dict(rank=64, damping=DAMPING, kl_clip=None, factor_decay=0.0, basis_update_interval=1)
        kfac = LowRankKFAC(model, include=["body"], statistics_examples=keep, **options)
        for step in range(3):  # factor_decay 0: each step's factors are its own slice's statistics
            start = (step * keep) % (BATCH - keep + 1)  # the slice moves through the batch
            a_rows, b_rows, gradient = reference_rows(model, x, y, loss_fn, slice(start, start + keep))
            examples = keep if case == "conv2d" else b_rows.shape[0]  # KFC: B sums over a conv's locations
            A, B = a_rows.T @ a_rows / a_rows.shape[0], b_rows.T @ b_rows / examples
            model.zero_grad()
            loss_fn(model, x, y).backward()
            kfac.step()
            got = torch.cat([model.body.weight.grad.reshape(gradient.shape[0], -1), model.body.bias.grad[:, None]], 1)
            torch.testing.assert_close(got, damped_natural(A, B, gradient, DAMPING), rtol=1e-9, atol=1e-12)
        kfac.close()
    finally:
        torch.set_default_dtype(torch.float32)


def test_bad_limit_fails_at_construction_naming_the_option():
    for value in (0, -2, 1.5, True, "8"):
        with pytest.raises(ValueError, match=r"`statistics_examples` must be a positive integer or null"):
            KFACOptions(statistics_examples=value)
