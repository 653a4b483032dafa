"""One small class per module type, and the choice of which modules of a model get one.

To handle a new module type, subclass :class:`KFACLayer` (rows of inputs and output
gradients, the gradient as a matrix) and add the class to :data:`LAYER_TYPES`.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from ..options import KFACOptions
from .attention import AttentionProjectionLayer, unsupported_attention
from .base import KFACLayer
from .conv import Conv1dLayer, Conv2dLayer, Conv3dLayer, ConvLayer
from .embedding import EmbeddingLayer
from .linear import LinearLayer

LAYER_TYPES: tuple[type[KFACLayer], ...] = (LinearLayer, Conv1dLayer, Conv2dLayer, Conv3dLayer, EmbeddingLayer)

__all__ = [
    "LAYER_TYPES",
    "AttentionProjectionLayer",
    "Conv1dLayer",
    "Conv2dLayer",
    "Conv3dLayer",
    "ConvLayer",
    "EmbeddingLayer",
    "KFACLayer",
    "LinearLayer",
    "parameter_holders",
]


def parameter_holders(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) → the names of the modules holding it directly (several for tied weights)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            holders.setdefault(id(parameter), []).append(name)
    return holders


#: Module types that hold trainable weights but keep the plain gradient, with the reason (coverage table).
PLAIN_MODULE_TYPES: tuple[tuple[type[nn.Module], str], ...] = (
    (
        nn.RNNBase,
        "recurrent layer (nn.LSTM / nn.GRU / nn.RNN): its weights are shared over time steps inside a fused kernel; not handled",
    ),
    (nn.modules.conv._ConvTransposeNd, "transposed convolution: not handled"),
    (nn.modules.batchnorm._NormBase, "normalization layer"),
    (nn.LayerNorm, "normalization layer"),
    (nn.GroupNorm, "normalization layer"),
)


def plain_reason(module: nn.Module) -> str | None:
    """Why a module of an unhandled type that holds weights keeps the plain gradient, if the type is known."""
    return next((reason for cls, reason in PLAIN_MODULE_TYPES if isinstance(module, cls)), None)


def layer_type(module: nn.Module) -> type[KFACLayer] | None:
    return next((cls for cls in LAYER_TYPES if isinstance(module, cls.module_type)), None)


def select_layers(model: nn.Module, options: KFACOptions) -> tuple[list[KFACLayer], dict[str, str]]:
    """The layers to precondition, and for every other module of a handled type the reason it stays plain."""
    layers: list[KFACLayer] = []
    skipped: dict[str, str] = {}
    # A parameter held by several modules (tied weights) gets the gradient of all its uses.
    holders = parameter_holders(model)

    def selected(name: str) -> bool:
        return options.include is None or any(fnmatch.fnmatchcase(name, p) for p in options.include)

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in options.exclude or ())

    def tied(name: str, module: nn.Module) -> list[str]:
        return sorted({other for p in module.parameters(recurse=False) for other in holders[id(p)]} - {name})

    # nn.MultiheadAttention passes in_proj and out_proj's weight to a functional call: their hooks
    # never fire, unless precondition_attention swaps in a forward made of hookable pieces.
    functional = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        out_proj = f"{name}.out_proj" if name else "out_proj"
        ties = tied(name, module)
        reason = None if options.precondition_attention else "nn.MultiheadAttention (precondition_attention=False)"
        reason = (
            reason
            or unsupported_attention(module)
            or (f"parameter shared with {ties} (tied weights)" if ties else None)
        )
        if not selected(name):
            functional.add(out_proj)
        elif excluded(name):
            skipped[name] = "excluded"
            functional.add(out_proj)
        elif reason is not None:
            skipped[name] = reason
            functional.add(out_proj)
        else:
            layers.extend(AttentionProjectionLayer.for_attention(name, module, options))
    for name, module in model.named_modules():
        cls = layer_type(module)
        if cls is None or not selected(name):
            continue
        if excluded(name):
            skipped[name] = "excluded"
        elif (reason := cls.unsupported(module, options)) is not None:
            skipped[name] = reason
        elif name in functional:
            skipped[name] = "weight used functionally by nn.MultiheadAttention"
        elif not module.weight.requires_grad:
            skipped[name] = "frozen weight"
        elif ties := tied(name, module):
            skipped[name] = f"parameter shared with {ties} (tied weights)"
        else:
            layers.append(cls.from_options(name, module, options))
    return layers, skipped
