"""Exact mode on Conv1d / Conv2d / Conv3d, grouped and depthwise, equals dense K-FAC built from patches extracted
by plain index loops (one block per group)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFAC
from lightning_lrkfac.examples.models import DepthwiseCNNClassifier

from .helpers import damped_natural, kfac_grads, with_ones


def naive_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows (batch·locations × in·kernel) by looping over output locations and kernel offsets (zero padding)."""
    dims = len(conv.kernel_size)
    padding = conv.padding if not isinstance(conv.padding, str) else None
    x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    sizes = [
        (x.shape[2 + i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1 for i in range(dims)
    ]
    rows = []
    for n in range(x.shape[0]):
        for location in itertools.product(*(range(s) for s in sizes)):
            row = []
            for channel in range(x.shape[1]):
                for offset in itertools.product(*(range(k) for k in conv.kernel_size)):
                    index = [location[i] * conv.stride[i] + offset[i] * conv.dilation[i] for i in range(dims)]
                    row.append(x[(n, channel, *index)])
            rows.append(torch.stack(row))
    return torch.stack(rows)


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


CASES = {
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (5, 2, 9)),
    "conv1d-no-bias": (lambda: nn.Conv1d(2, 3, 2, padding=2, bias=False), (5, 2, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (4, 2, 5, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1, dilation=(2, 1, 1)), (3, 2, 4, 4, 3)),
    "conv3d-no-bias": (lambda: nn.Conv3d(1, 2, (1, 2, 2), padding=(0, 1, 0), bias=False), (3, 1, 3, 3, 3)),
    "conv2d-groups-2": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 4, 5, 5)),
    "conv2d-depthwise": (lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3), (4, 3, 4, 4)),
    "conv1d-depthwise-multiplier-2": (lambda: nn.Conv1d(2, 4, 3, groups=2, bias=False), (5, 2, 7)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("unfold_elements", [None, 1], ids=["whole-batch", "one-example-at-a-time"])
def test_exact_mode_on_convolutions_matches_a_loop_built_dense_reference(case, unfold_elements, monkeypatch):
    if unfold_elements is not None:  # a 2D conv's dense A is summed over chunks of the batch
        monkeypatch.setattr("lightning_lrkfac.layers.conv.UNFOLD_ELEMENTS", unfold_elements)
    builder, shape = CASES[case]
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model, x = ConvNet(builder()), torch.randn(*shape)
        model(x)  # materialise the lazy head
        y = torch.randint(0, 3, (shape[0],))
        conv, damping = model.conv, 1e-2
        outputs = {}
        handle = conv.register_forward_hook(lambda module, args, out: outputs.__setitem__("s", out))
        loss = F.cross_entropy(model(x), y)
        handle.remove()
        (output_grad,) = torch.autograd.grad(loss, outputs["s"], retain_graph=True)
        weight_grads = torch.autograd.grad(loss, [p for p in conv.parameters()])
        patches = naive_patches(conv, x)
        rows = output_grad.movedim(1, -1).reshape(-1, conv.out_channels) * shape[0]  # per-example grads
        groups, out = conv.groups, conv.out_channels // conv.groups
        width = patches.shape[1] // groups
        expected, gradients = [], []
        for g in range(groups):  # each group its own block, with its own π
            a, b_rows = patches[:, g * width : (g + 1) * width], rows[:, g * out : (g + 1) * out]
            gradient = weight_grads[0][g * out : (g + 1) * out].reshape(out, -1)
            if conv.bias is not None:
                a = with_ones(a)
                gradient = torch.cat([gradient, weight_grads[1][g * out : (g + 1) * out, None]], 1)
            # KFC (Grosse & Martens 2016; asdl's Conv2d convention): A averages over locations, B sums over them.
            A, B = a.T @ a / a.shape[0], b_rows.T @ b_rows / shape[0]
            expected.append(damped_natural(A, B, gradient, damping))
            gradients.append(gradient)
        expected, gradient = torch.cat(expected), torch.cat(gradients)
        grads, kfac = kfac_grads(model, x, y, rank=64, damping=damping, kl_clip=None, include=["conv"])
    finally:
        torch.set_default_dtype(torch.float32)
    assert [layer.name for layer in kfac.layers] == ["conv"]
    got = grads[0].reshape(conv.out_channels, -1)  # groups stacked: the rows of each group's block
    if conv.bias is not None:
        got = torch.cat([got, grads[1][:, None]], 1)
    assert not torch.allclose(got, gradient, rtol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_resnet_style_cnn_with_depthwise_blocks_is_covered_and_trains():
    torch.manual_seed(0)
    model = DepthwiseCNNClassifier(widths=(32, 64))  # depthwise + pointwise residual blocks, batch norms
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with LowRankKFAC(model, rank=16, damping=1e-2) as kfac:
        losses = []
        for _ in range(15):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            kfac.step(lr=optimizer)
            optimizer.step()
            losses.append(float(loss))
    rows = kfac.coverage
    share = sum(r["numel"] for r in rows if r["preconditioned"]) / sum(r["numel"] for r in rows)
    assert share >= 0.95, kfac.coverage_report()
    assert {r["how"].split(", A")[0] for r in rows if "depthwise.weight" in r["parameter"]} == {
        "K-FAC Conv2d, 32 groups",
        "K-FAC Conv2d, 64 groups",
    }
    assert losses[-1] < 0.5 * losses[0], losses
