"""nn.Linear, on inputs (batch, features) or (batch, positions…, features)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from .base import KFACLayer

if TYPE_CHECKING:
    from ..options import KFACOptions


class LinearLayer(KFACLayer):
    """A Linear shares its weight over the middle dimensions of its input (sequence positions…).

    ``weight_sharing="expand"`` treats every position as an example; ``"reduce"`` first
    averages the inputs and sums the output gradients over the shared dimensions, one row
    per example (K-FAC-expand / -reduce, Eschenhagen et al. 2023). The batch must be the
    first dimension.
    """

    module_type = nn.Linear

    def __init__(
        self, name: str, module: nn.Linear, bias_mode: str = "augment", weight_sharing: str = "expand"
    ) -> None:
        has_bias, augment = self.bias_flags(module, bias_mode)
        in_features, out_features = self.features(module)
        super().__init__(name, module, in_features + int(augment), out_features, has_bias, augment)
        self.reduce = weight_sharing == "reduce"

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        """(in, out) of the module's weight."""
        return module.in_features, module.out_features

    @classmethod
    def from_options(cls, name: str, module: nn.Module, options: KFACOptions) -> LinearLayer:
        return cls(name, module, bias_mode=options.bias_mode, weight_sharing=options.weight_sharing)

    def _input_rows(self, inputs: Tensor) -> Tensor:
        if self.reduce and inputs.dim() > 2:
            inputs = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).mean(1)
        return inputs.reshape(-1, inputs.shape[-1])

    def output_grad_rows(self, grads: Tensor) -> Tensor:
        if self.reduce and grads.dim() > 2:
            grads = grads.reshape(grads.shape[0], -1, grads.shape[-1]).sum(1)
        return grads.reshape(-1, grads.shape[-1])

    def num_samples(self, grads: Tensor) -> int:
        """The batch when reduced, every position when expanded."""
        if self.reduce and grads.dim() > 2:
            return grads.shape[0]
        return grads.numel() // grads.shape[-1]
