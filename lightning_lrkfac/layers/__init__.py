"""One small class per module type, and the choice of which modules of a model get one.

To handle a new module type, subclass :class:`KFACLayer` (rows of inputs and output
gradients, the gradient as a matrix) and pass the class to :func:`register_layer_type`.
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
from .tied import TiedEmbeddingLayer, tie_reason
from .transposed_linear import TransposedLinearLayer

#: The layer classes tried in order on every module; :func:`register_layer_type` puts user classes first.
LAYER_TYPES: list[type[KFACLayer]] = [
    LinearLayer,
    TransposedLinearLayer,
    Conv1dLayer,
    Conv2dLayer,
    Conv3dLayer,
    EmbeddingLayer,
]


def register_layer_type(layer_class: type[KFACLayer]) -> type[KFACLayer]:
    """Handle the modules that ``layer_class`` handles (its ``module_type``, or its ``handles``) with it.

    Tried before the built-in classes, so a subclass of ``nn.Linear`` with its own class wins; registering the
    same class again does nothing. Usable as a class decorator.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, KFACLayer)):
        raise TypeError(f"register_layer_type takes a subclass of KFACLayer, got {layer_class!r}")
    if layer_class not in LAYER_TYPES:
        LAYER_TYPES.insert(0, layer_class)
    return layer_class


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
    "TiedEmbeddingLayer",
    "TransposedLinearLayer",
    "parameter_holders",
    "register_layer_type",
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
    return next((cls for cls in LAYER_TYPES if cls.handles(module)), None)


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

    modules = dict(model.named_modules())
    tie_handled: set[str] = set()

    def tie_outcome(name: str, module: nn.Module, ties: list[str]) -> str | TiedEmbeddingLayer:
        """The one block of an embedding table tied to a head, or why the tie keeps the plain gradient.

        Several nn.Embedding modules holding the table (T5's encoder and decoder) are one use: their lookups add up.
        """
        users = sorted([name, *ties])
        shared = f"parameter shared with {ties} (tied weights)"
        unselected = [other for other in ties if not selected(other) or excluded(other)]
        if unselected:
            return f"{shared}: {unselected} not selected (include/exclude)"
        embeddings = [user for user in users if isinstance(modules[user], nn.Embedding)]
        heads = [user for user in users if user not in embeddings]
        if len(heads) != 1 or not embeddings:
            return (
                f"{shared}: used as {len(embeddings)} embedding(s) and {len(heads)} other module(s); "
                "only a table used by nn.Embedding modules and one head is handled"
            )
        head = modules[heads[0]]
        for embedding in embeddings:
            if (reason := tie_reason(modules[embedding], head, options)) is not None:
                return f"{shared}: {reason}"
        return TiedEmbeddingLayer(heads[0], head, {user: modules[user] for user in embeddings}, options)

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
            if name in tie_handled:
                continue
            outcome = tie_outcome(name, module, ties)
            if isinstance(outcome, str):
                skipped[name] = outcome
            else:
                layers.append(outcome)
                tie_handled.update(outcome.hooked_modules())
        else:
            layers.append(cls.from_options(name, module, options))
    return layers, skipped
