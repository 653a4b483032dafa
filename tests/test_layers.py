"""im2col rows and gradient matrices: checked against the layers' own forward and autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_lrkfac.layers import Conv2dLayer, LinearLayer, layer_type
from lightning_lrkfac.lowrank import DenseFactor


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv2d(3, 4, (2, 3), padding="same"),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(3, 4, 3, padding="valid", stride=(1, 2)),
    ],
)
def test_conv_rows_reproduce_forward_and_weight_grad(conv):
    layer = Conv2dLayer("conv", conv, bias_mode="augment")
    x = torch.randn(2, 3, 7, 8)
    out = conv(x)
    rows = layer.input_rows(x)
    weight = conv.weight.reshape(conv.out_channels, -1)
    if layer.augment:
        weight = torch.cat([weight, conv.bias[:, None]], dim=1)
    expected = layer.output_grad_rows(out)
    torch.testing.assert_close(rows @ weight.T, expected, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    g_rows = layer.output_grad_rows(grad_out)
    torch.testing.assert_close(layer.grad_matrix(), g_rows.T @ rows, rtol=1e-5, atol=1e-5)
    assert layer.num_samples(grad_out) == 2


def test_linear_rows_on_sequences_flatten_positions():
    linear = nn.Linear(5, 3)
    layer = LinearLayer("lin", linear, bias_mode="augment")
    x = torch.randn(2, 4, 5)
    out = linear(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    rows, g_rows = layer.input_rows(x), layer.output_grad_rows(grad_out)
    assert rows.shape == (8, 6) and torch.all(rows[:, -1] == 1)
    torch.testing.assert_close(layer.grad_matrix(), g_rows.T @ rows)
    assert layer.num_samples(grad_out) == 8


def test_write_grads_round_trip_separate_bias():
    linear = nn.Linear(5, 3)
    layer = LinearLayer("lin", linear, bias_mode="separate")
    linear(torch.randn(4, 5)).sum().backward()
    matrix, bias = torch.randn(3, 5), torch.randn(3, 1)
    layer.write_grads(matrix, bias)
    torch.testing.assert_close(linear.weight.grad, matrix)
    torch.testing.assert_close(linear.bias.grad, bias[:, 0])


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
        (nn.Conv1d(3, 4, 4, stride=2, padding=3, dilation=2, bias=False), (2, 3, 11)),
        (nn.Conv1d(3, 4, 3, padding="same", padding_mode="circular"), (2, 3, 7)),
        (nn.Conv3d(2, 3, 3, padding=1), (2, 2, 4, 5, 3)),
        (
            nn.Conv3d(2, 3, (2, 3, 1), stride=(2, 1, 1), padding=(1, 2, 0), dilation=(1, 2, 1), bias=False),
            (2, 2, 5, 6, 3),
        ),
        (nn.Conv3d(2, 3, 3, padding="same", padding_mode="reflect"), (2, 2, 4, 5, 4)),
    ],
    ids=["1d", "1d-stride-dilation", "1d-same-circular", "3d", "3d-mixed", "3d-same-reflect"],
)
def test_conv1d_and_conv3d_rows_reproduce_forward_and_weight_grad(conv, shape):
    layer = layer_type(conv)("conv", conv, bias_mode="augment")
    x = torch.randn(*shape)
    out = conv(x)
    rows = layer.input_rows(x)
    weight = conv.weight.reshape(conv.out_channels, -1)
    if layer.augment:
        weight = torch.cat([weight, conv.bias[:, None]], dim=1)
    torch.testing.assert_close(rows @ weight.T, layer.output_grad_rows(out), rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(layer.grad_matrix(), layer.output_grad_rows(grad_out).T @ rows, rtol=1e-5, atol=1e-5)
    assert layer.num_samples(grad_out) == 2 and layer.describe() == type(conv).__name__


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 7, 8)),
        (nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2, bias=False), (2, 3, 9, 9)),
        (nn.Conv1d(4, 6, 5, padding="same", padding_mode="circular"), (3, 4, 11)),
        (nn.Conv3d(2, 5, 2, stride=(1, 2, 1), padding=1), (2, 2, 4, 5, 3)),
        (nn.Conv2d(3, 8, (2, 3), padding="same", padding_mode="reflect"), (2, 3, 6, 7)),
    ],
    ids=["2d", "2d-stride-dilation-no-bias", "1d-same-circular", "3d", "2d-same-reflect"],
)
def test_low_rank_conv_sketch_by_convolutions_equals_the_sketch_of_unfolded_patches(conv, shape):
    """Two convolutions (P V, then the weight gradient Pᵀ(P V)) instead of patches: the same pending sums."""
    conv = conv.double()
    by_convolutions, by_patches = (layer_type(conv)("conv", conv) for _ in range(2))
    for layer in (by_convolutions, by_patches):
        layer.build_factors(4, 2, 0, False, torch.Generator().manual_seed(0), torch.float64)
    inputs = [torch.randn(*shape, dtype=torch.float64) for _ in range(2)]  # a module called twice
    by_convolutions._accumulate_inputs(inputs)
    rows = torch.cat([by_patches.input_rows(x) for x in inputs])
    by_patches.a_factor.accumulate(rows, 1.0 / rows.shape[0])
    for got, expected in zip(by_convolutions.a_factor.pending_tensors(), by_patches.a_factor.pending_tensors()):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert by_convolutions.a_factor.pending_count == 1


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.Conv2d(3, 8, (2, 3), padding="same", padding_mode="reflect"),
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False),
    ],
    ids=["2d", "2d-stride-dilation-no-bias", "2d-same-reflect", "2d-groups-2", "2d-depthwise-stride"],
)
@pytest.mark.parametrize("unfold_elements", [None, 1], ids=["whole-batch", "one-example-at-a-time"])
def test_dense_conv_factor_from_patch_grams_equals_the_factor_of_patch_rows(conv, unfold_elements, monkeypatch):
    """im2col read as (batch, groups, d, locations) and one batched matmul: the same pending A as its rows."""
    if unfold_elements is not None:
        monkeypatch.setattr("lightning_lrkfac.layers.conv.UNFOLD_ELEMENTS", unfold_elements)
    conv = conv.double()
    by_grams, by_rows = (layer_type(conv)("conv", conv) for _ in range(2))
    for layer in (by_grams, by_rows):
        layer.build_factors(64, 2, 0, False, torch.Generator().manual_seed(0), torch.float64)
    assert isinstance(by_grams.a_factor, DenseFactor)
    inputs = [torch.randn(3, conv.in_channels, 6, 7, dtype=torch.float64) for _ in range(2)]  # called twice
    by_grams._accumulate_inputs(inputs)
    rows = torch.cat([by_rows._input_rows(x) for x in inputs], dim=-2)
    by_rows.a_factor.accumulate(rows, 1.0 / rows.shape[-2], ones_column=by_rows.augment)
    for got, expected in zip(by_grams.a_factor.pending_tensors(), by_rows.a_factor.pending_tensors()):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert by_grams.a_factor.pending_count == 1


def test_low_rank_conv_sketch_takes_half_precision_inputs():
    """Under AMP the captured inputs are 16-bit: the sketch is computed in the factor's float32."""
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = layer_type(conv)("conv", conv)
    layer.build_factors(4, 2, 0, False, torch.Generator().manual_seed(0), torch.float32)
    x = torch.randn(2, 3, 6, 6)
    layer._accumulate_inputs([x.bfloat16()])
    reference = layer_type(conv)("conv", conv)
    reference.build_factors(4, 2, 0, False, torch.Generator().manual_seed(0), torch.float32)
    reference._accumulate_inputs([x.bfloat16().float()])
    torch.testing.assert_close(layer.a_factor.pending_sketch, reference.a_factor.pending_sketch)


@pytest.mark.parametrize("low_rank", [True, False], ids=["low-rank-A", "dense-A"])
def test_conv_statistics_taken_a_few_examples_at_a_time_equal_one_pass(low_rank, monkeypatch):
    """A conv's output gradients become rows a few examples at a time, and Σ x² of a low-rank A's trace is summed
    over pieces of the batch: the same pending sums, one estimate per call."""
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1).double()
    inputs = [torch.randn(9, 3, 8, 8, dtype=torch.float64) for _ in range(2)]  # a module called twice
    grads = [torch.randn(9, 6, 4, 4, dtype=torch.float64) for _ in range(2)]
    layers = []
    for chunk in (None, 2 * 6 * 4 * 4):  # whole, then 2 examples of output gradients (or input rows) per piece
        if chunk is not None:
            monkeypatch.setattr("lightning_lrkfac.lowrank.CPU_CHUNK_ELEMENTS", chunk)
        layer = layer_type(conv)("conv", conv)
        layer.build_factors(2 if low_rank else 64, 2, 0, False, torch.Generator().manual_seed(0), torch.float64)
        layer.accumulate(inputs, grads, lambda examples: examples)
        layers.append(layer)
    whole, pieces = layers
    for factor_whole, factor_pieces in zip(whole.factors, pieces.factors):
        for got, expected in zip(factor_pieces.pending_tensors(), factor_whole.pending_tensors()):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert factor_pieces.pending_count == factor_whole.pending_count == 1
