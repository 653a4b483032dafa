"""nn.Conv1d / Conv2d / Conv3d: A from patches, one row per output location (KFC, Grosse & Martens
2016); B over the output channels. Every output location is an example (expand). A grouped or
depthwise convolution is one K-FAC block per group, all groups kept exactly and batched."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compat import pad_like_conv
from ..lowrank import DenseFactor, LowRankFactor, row_chunks
from .base import KFACLayer

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
CONV_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
#: Numbers of patches unfolded at once for a dense A's statistics (4 MB in float32).
UNFOLD_ELEMENTS = 1 << 20

if TYPE_CHECKING:
    from ..eigenbasis import Bases, RowPairing
    from ..options import KFACOptions


def explicitly_padded(module: nn.Module, inputs: Tensor, always: bool = False) -> tuple[Tensor, int | tuple[int, ...]]:
    """(inputs, padding left to the op): padding modes and ``padding="same"`` are applied here, zeros left to the op."""
    if always or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return pad_like_conv(module, inputs), 0
    return inputs, module.padding


def conv_patches(module: nn.Module, inputs: Tensor) -> Tensor:
    """The receptive field of every output location as rows (batch·locations × in_channels·kernel).

    Columns are ordered as ``module.weight[o].reshape(-1)``, so rows @ Wᵀ is the conv's output
    without bias. 2D uses im2col (``F.unfold``); 1D and 3D unfold each spatial dim in turn.
    """
    dims = len(module.kernel_size)
    inputs, padding = explicitly_padded(module, inputs, always=dims != 2)  # Tensor.unfold cannot pad
    if dims == 2:
        patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    for offset, (kernel, stride, dilation) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        span = dilation * (kernel - 1) + 1
        inputs = inputs.unfold(2 + offset, span, stride)[..., ::dilation]  # appends a kernel dim
    # (batch, channels, out_1..out_d, k_1..k_d) → (batch, out_1..out_d, channels, k_1..k_d)
    inputs = inputs.movedim(1, 1 + dims)
    return inputs.reshape(-1, module.in_channels * math.prod(module.kernel_size))


def patch_counts(module: nn.Module, inputs: Tensor, out_size: torch.Size, geometry: dict) -> Tensor:
    """How many (output location, kernel tap) pairs read each input position: the conv's input gradient of all-ones
    output gradients and an all-ones kernel. Σ over patches of ‖p‖² is then Σ x² weighted by it."""
    dims = len(module.kernel_size)
    ones = inputs.new_ones(1, 1, *module.kernel_size)
    counts = CONV_INPUT_GRAD[dims]((1, 1, *inputs.shape[2:]), ones, ones.new_ones(1, 1, *out_size), **geometry)
    return counts[0, 0]


class ConvLayer(KFACLayer):
    """What the three conv classes share; the weight of each group is (out/groups) × (in/groups·kernel)."""

    def __init__(self, name: str, module: nn.Module, bias_mode: str = "augment") -> None:
        has_bias, augment = self.bias_flags(module, bias_mode)
        in_dim, out_dim = module.weight[0].numel() + int(augment), module.out_channels // module.groups
        super().__init__(name, module, in_dim, out_dim, has_bias, augment)
        self.groups = module.groups
        self.blocks = (module.groups,) if module.groups > 1 else ()

    @classmethod
    def unsupported(cls, module: nn.Module, options: KFACOptions) -> str | None:
        """Grouped convolutions are kept exact per group: their blocks must be within the dense limit."""
        if module.groups == 1:
            return None
        limit = options.dense_size
        sizes = (module.weight[0].numel() + 1, module.out_channels // module.groups)
        if max(sizes) <= limit:
            return None
        return (
            f"groups={module.groups} with per-group factors of sizes {sizes} above the dense size {limit}: grouped "
            "blocks are kept exact only; raise `dense_threshold` to cover them"
        )

    def describe(self) -> str:
        groups = f", {self.groups} groups" if self.groups > 1 else ""
        return self.module_type.__name__ + groups

    def _accumulate_inputs(self, inputs: list[Tensor], bases: Bases | None = None) -> RowPairing | None:
        """A low-rank A of a plain conv is sketched with two convolutions instead of unfolded patches.

        With the patches P (rows) and the test matrix V: P V is the conv of the input with V's
        columns as m kernels, and Pᵀ(P V) is that conv's weight gradient for output gradient P V;
        Σ P² is the conv of x² with a ones kernel. No patch matrix is ever formed. The first k
        columns of V are A's kept eigenvectors U, so P U (for EKFAC's pairs) comes for free.
        """
        if isinstance(self.a_factor, DenseFactor) and len(self.module.kernel_size) == 2 and bases is None:
            return self._accumulate_patch_grams(inputs)
        if self.groups != 1 or not isinstance(self.a_factor, LowRankFactor):
            return super()._accumulate_inputs(inputs, bases)
        module, dims = self.module, len(self.module.kernel_size)
        conv, weight_grad = CONV[dims], CONV_WEIGHT_GRAD[dims]
        test = self.a_factor.test  # computed in the factor's dtype, as the patches would be
        body = test[:-1] if self.augment else test
        kernels = body.mT.reshape(body.shape[1], module.in_channels, *module.kernel_size)
        products, squares, rotated, rows = [], [], [], 0
        for x in inputs:
            x, padding = explicitly_padded(module, self._batched(x).to(test.dtype))
            geometry = dict(stride=module.stride, padding=padding, dilation=module.dilation)
            projected = conv(x, kernels, test[-1] if self.augment else None, **geometry)  # P V, (N, m, *out)
            product = weight_grad(x, kernels.shape, projected, **geometry).reshape(body.shape[1], -1).mT
            locations = projected.numel() // projected.shape[1]
            counts = patch_counts(module, x, projected.shape[2:], geometry)
            square = (sum(piece.square().sum((0, 1)) for piece in row_chunks(x, dim=0)) * counts).sum()
            if self.augment:  # the ones column: its row of Pᵀ(PV) is Σ PV, its square 1 per location
                product = torch.cat([product, projected.transpose(0, 1).reshape(body.shape[1], -1).sum(1)[None]])
                square = square + locations
            products.append(product)
            squares.append(square)
            rows += locations
            if bases is not None:
                rank = bases.right.shape[-1]
                rotated.append(projected[:, :rank].movedim(1, -1).reshape(-1, rank))
        self.a_factor.accumulate_sketch(sum(products), sum(squares), 1.0 / rows)
        if bases is None:
            return None
        squared = torch.cat(rotated).square()
        return lambda left: left @ squared

    def _accumulate_patch_grams(self, inputs: list[Tensor]) -> None:
        """A dense A (each group's, for a grouped conv) as Σ PᵀP, from im2col's (batch, channels·kernel, locations)
        read as (batch, groups, d, locations): a view and one batched matmul, no patch rows formed or transposed.

        The batch is unfolded a few examples at a time (about :data:`UNFOLD_ELEMENTS` numbers), so the
        patches stay in cache and never take memory of the size of the whole unfold.
        """
        module, gram, sums, count = self.module, 0, 0, 0
        for x in inputs:
            x, padding = explicitly_padded(module, self._batched(x).to(self.a_factor.dtype))
            geometry = dict(dilation=module.dilation, padding=padding, stride=module.stride)
            per_example = self.a_factor.dim * self.groups * math.prod(x.shape[2:])  # about: locations ≈ pixels
            for chunk in x.split(max(1, UNFOLD_ELEMENTS // per_example)):
                patches = F.unfold(chunk, module.kernel_size, **geometry)
                patches = patches.view(patches.shape[0], self.groups, -1, patches.shape[-1])
                gram = gram + torch.matmul(patches, patches.mT).sum(0)
                sums = sums + patches.sum((0, 3)) if self.augment else None
                count += patches.shape[0] * patches.shape[-1]
        if not self.blocks:  # one group: the factor has no group dim
            gram, sums = gram[0], None if sums is None else sums[0]
        self.a_factor.accumulate_gram(gram, sums, count, 1.0 / count)

    def _grouped(self, rows: Tensor) -> Tensor:
        """(n, groups·d) rows → (groups, n, d): each group's channels are contiguous columns."""
        if self.groups == 1:
            return rows
        return rows.reshape(rows.shape[0], self.groups, -1).transpose(0, 1)

    def _batched(self, tensor: Tensor) -> Tensor:
        """Unbatched calls (channels, spatial…) get a batch of one."""
        return tensor if self.batched(tensor) else tensor.unsqueeze(0)

    def batched(self, inputs: Tensor) -> bool:
        return inputs.dim() == len(self.module.kernel_size) + 2

    def _input_rows(self, inputs: Tensor) -> Tensor:
        return self._grouped(conv_patches(self.module, self._batched(inputs)))

    def output_grad_rows(self, grads: Tensor) -> Tensor:
        grads = self._batched(grads)
        return self._grouped(grads.movedim(1, -1).reshape(-1, grads.shape[1]))

    def _accumulate_output_grads(self, grads: list[Tensor], weight: float) -> None:
        """A few examples at a time on a CPU (:func:`~..lowrank.row_chunks`): the copy that turns (N, C, …) into
        rows, and what is computed from it, stay in cache."""
        pieces = [piece for g in grads for piece in row_chunks(self._batched(g), dim=0)]
        for index, piece in enumerate(pieces):
            self.b_factor.accumulate(self.output_grad_rows(piece), weight, new_estimate=index == 0)

    def num_samples(self, grads: Tensor) -> int:
        """The batch: a mean-reduced loss averages over examples, not locations."""
        return self._batched(grads).shape[0]


class Conv1dLayer(ConvLayer):
    module_type = nn.Conv1d


class Conv2dLayer(ConvLayer):
    module_type = nn.Conv2d


class Conv3dLayer(ConvLayer):
    module_type = nn.Conv3d
