"""nn.Conv2d (groups = 1): A from im2col patches, one row per output location (KFC, Grosse & Martens 2016)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from ..compat import pad_like_conv
from .base import KFACLayer

if TYPE_CHECKING:
    from ..options import KFACOptions


class Conv2dLayer(KFACLayer):
    """Every output location is an example (expand); the weight is out × (in·kh·kw)."""

    module_type = nn.Conv2d

    def __init__(self, name: str, module: nn.Conv2d, bias_mode: str = "augment") -> None:
        has_bias, augment = self.bias_flags(module, bias_mode)
        super().__init__(name, module, module.weight[0].numel() + int(augment), module.out_channels, has_bias, augment)

    @classmethod
    def unsupported(cls, module: nn.Module, options: KFACOptions) -> str | None:
        return f"groups={module.groups} (only groups=1 is handled)" if module.groups != 1 else None

    def describe(self) -> str:
        return "Conv2d"

    def _input_rows(self, inputs: Tensor) -> Tensor:
        module, padding = self.module, self.module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            inputs, padding = pad_like_conv(module, inputs), 0
        patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def output_grad_rows(self, grads: Tensor) -> Tensor:
        return grads.movedim(1, -1).reshape(-1, grads.shape[1])

    def num_samples(self, grads: Tensor) -> int:
        """The batch: a mean-reduced loss averages over examples, not locations."""
        return grads.shape[0]
