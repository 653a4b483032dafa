"""Each ready layer's step as one small object: its term of the KL clip and its write into ``.grad``.

A :class:`LayerStep` knows its term of the clip, η_w²⟨P_w, G_w⟩ + η_b²⟨P_b, G_b⟩, and how to write its direction
(times the clip's scale) into ``.grad``. Three kinds exist: a direction computed whole (:class:`GeneralStep`),
one planned from small projections and written in place (:class:`FusedStep`), and a rank's row shard under
FSDP2 (:class:`.sharding.ShardStep`), whose terms are parts of a layer's and are summed over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .fused import FusedKroneckerStep
    from .layers import KFACLayer

#: Parameter → its learning rate (the KL clip weighs each parameter's term by its own rate squared).
LearningRates = Callable[[Tensor], float]


class LayerStep(Protocol):
    """One layer's natural-gradient step, computed but not yet written."""

    #: Whether :meth:`kl_term` is this rank's part of a layer's term (summed over the ranks before the clip).
    partial: bool

    def kl_term(self, learning_rate: LearningRates) -> Tensor:
        """η_w²⟨P_w, G_w⟩ + η_b²⟨P_b, G_b⟩ with each parameter's own learning rate."""

    def write(self, scale: Tensor | None) -> None:
        """The direction, times ``scale`` if given, into the gradients (one pass per tensor)."""


def learning_rates(lr: float | torch.optim.Optimizer | None) -> LearningRates:
    """Parameter → its learning rate: the group's rate for an optimizer, else the one number (or 0)."""
    if hasattr(lr, "param_groups"):
        rates = {id(p): float(group["lr"]) for group in lr.param_groups for p in group["params"]}
        return lambda parameter: rates.get(id(parameter), 0.0)
    value = 0.0 if lr is None else float(lr)
    return lambda parameter: value


def layer_rates(layer: KFACLayer, learning_rate: LearningRates) -> tuple[float, float]:
    """(the weight's rate, the bias's rate; the weight's when there is no bias)."""
    weight_rate = learning_rate(layer.weight)
    return weight_rate, (learning_rate(layer.module.bias) if layer.has_bias else weight_rate)


def products_wanted(layer: KFACLayer, kl_clip: float | None, learning_rate: LearningRates | None) -> str:
    """What the clip needs of an in-place step: nothing, one ⟨N, G⟩, or the weight's and bias's apart (own rates)."""
    if kl_clip is None:
        return "none"
    weight_rate, bias_rate = layer_rates(layer, learning_rate)
    return "total" if weight_rate == bias_rate else "split"


@dataclass
class GeneralStep:
    """A direction computed whole (any rule, any factor), written into ``.grad`` with the clip's scale."""

    layer: KFACLayer
    grads: list[Tensor]
    naturals: list[Tensor]
    partial = False

    def kl_term(self, learning_rate: LearningRates) -> Tensor:
        weight_rate, bias_rate = layer_rates(self.layer, learning_rate)
        if bias_rate == weight_rate:
            return weight_rate**2 * sum((natural * grad).sum() for natural, grad in zip(self.naturals, self.grads))
        weight_term, bias_term = self.layer.split_inner_product(self.naturals, self.grads)
        return weight_rate**2 * weight_term + bias_rate**2 * bias_term

    def write(self, scale: Tensor | None) -> None:
        bias_column = self.naturals[1] if len(self.naturals) > 1 else None
        self.layer.write_grads(self.naturals[0], bias_column, scale)


@dataclass
class FusedStep:
    """Plain K-FAC planned from small projections and written into ``.grad`` in place (:mod:`.fused`)."""

    layer: KFACLayer
    plan: FusedKroneckerStep
    partial = False

    def kl_term(self, learning_rate: LearningRates) -> Tensor:
        weight_term, *bias_term = self.plan.inner_products
        weight_rate, bias_rate = layer_rates(self.layer, learning_rate)
        total = weight_rate**2 * weight_term
        return total + bias_rate**2 * bias_term[0] if bias_term else total

    def write(self, scale: Tensor | None) -> None:
        self.plan.apply(scale)
