"""Hugging Face's ``Conv1D`` (GPT-2's attention and MLP): a Linear whose weight is stored transposed, (in, out)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from .linear import LinearLayer

if TYPE_CHECKING:
    from ..options import KFACOptions


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (a subclass of) ``transformers``' ``Conv1D``, recognised without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") for cls in type(module).__mro__)


class TransposedLinearLayer(LinearLayer):
    """y = x W + b with W of shape (in, out): the Linear of K-FAC with its gradient read and written as Wᵀ (a view).

    Inputs and output gradients become rows exactly as for ``nn.Linear`` (expand or reduce over positions).
    """

    shard_side = None

    module_type = nn.Module  # matched by name: see :meth:`handles`

    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        return is_hf_conv1d(module)

    @classmethod
    def unsupported(cls, module: nn.Module, options: KFACOptions) -> str | None:
        if getattr(module, "weight", None) is None or module.weight.dim() != 2:
            shape = None if getattr(module, "weight", None) is None else tuple(module.weight.shape)
            return f"Conv1D whose weight is not 2-D (shape {shape}): not handled"
        return None

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        in_features, out_features = module.weight.shape
        return in_features, out_features

    def describe(self) -> str:
        return f"Conv1D, transposed Linear ({'reduce' if self.reduce else 'expand'})"

    def as_matrix(self, weight_like: Tensor) -> Tensor:
        return weight_like.mT
