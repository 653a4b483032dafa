"""The apply path: every ready layer's step, planned one way for each layer, written with one KL clip.

A layer's step is written in place where its factors allow it (:mod:`.fused`), computed by its owner and shared
with the other ranks (:mod:`.assignment`), or computed on this rank's row shard under FSDP2 (:mod:`.sharding`).
The clip's budget Σ η²⟨P, G⟩ (Ba et al. 2017) is summed over all of them in :func:`apply_steps`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .layer_steps import FusedStep, GeneralStep, LayerStep, LearningRates, products_wanted
from .preconditioner import kl_clip_scale

if TYPE_CHECKING:
    from .assignment import WorkAssignment
    from .layers import KFACLayer
    from .sharding import ShardedPreconditioner
    from .step_rules import StepRule


def plan_steps(
    layers: Sequence[KFACLayer],
    rules: Sequence[StepRule],
    assignment: WorkAssignment,
    sharding: ShardedPreconditioner | None,
    damping: float | None,
    wanted: Callable[[KFACLayer], str],
    grads_finite: Tensor | None = None,
) -> list[LayerStep]:
    """The steps of the ready layers with a gradient (the others keep theirs). ``wanted(layer)``: what the
    clip needs of an in-place step; ``grads_finite`` (AMP) False: rules that keep moments leave them unchanged."""
    fused, general, sharded = [], [], []
    for index, (layer, rule) in enumerate(zip(layers, rules)):
        if not layer.ready:  # no statistics yet (e.g. never called): plain gradient
            continue
        if sharding is not None and index in sharding:
            sharded.append(index)
            continue
        if rule.fusable and assignment.fuses:
            plan = rule.fused_step(wanted(layer))
            if plan is not None:
                fused.append(FusedStep(layer, plan))
                continue
        grad = layer.grad_matrix()
        if grad is None:
            continue
        bias = layer.separate_bias_grad()
        grads = [grad.to(layer.dtype)] + ([] if bias is None else [bias.to(layer.dtype)])
        if assignment.owns(index):
            naturals = rule.precondition(grads, damping, grads_finite)
        else:  # filled by the owner's broadcast
            naturals = [torch.empty_like(g) for g in grads]
        general.append((index, GeneralStep(layer, grads, naturals)))
    assignment.share_directions(general)
    return [step for _, step in general] + fused + (sharding.steps(sharded) if sharded else [])


def apply_steps(
    steps: Sequence[LayerStep],
    kl_clip: float | None,
    learning_rate: LearningRates | None,
    sum_over_ranks: Callable[[list[Tensor]], None] | None = None,
    device: torch.device | None = None,
) -> None:
    """Write every step, scaled so that Σ η²⟨P, G⟩ ≤ ``kl_clip`` when the clip is on.

    ``sum_over_ranks`` (FSDP2): sums the partial terms over the ranks in place; every rank calls it, with or without
    partial steps of its own, so the collective always matches.
    """
    scale = None
    if kl_clip is not None and steps:
        budget = sum(step.kl_term(learning_rate) for step in steps if not step.partial)
        if sum_over_ranks is not None:
            parts = torch.zeros((), dtype=torch.float64, device=device)
            for step in steps:
                if step.partial:
                    parts = parts + step.kl_term(learning_rate)
            sum_over_ranks([parts])
            budget = budget + parts
        scale = kl_clip_scale(kl_clip, 1.0, budget)
    for step in steps:
        step.write(scale)


def precondition_layers(
    layers: Sequence[KFACLayer],
    rules: Sequence[StepRule],
    assignment: WorkAssignment,
    sharding: ShardedPreconditioner | None,
    damping: float | None,
    learning_rate: LearningRates | None,
    kl_clip: float | None,
    grads_finite: Tensor | None = None,
) -> None:
    """Plan every ready layer's step and write them all with one KL clip."""
    steps = plan_steps(
        layers,
        rules,
        assignment,
        sharding,
        damping,
        partial(products_wanted, kl_clip=kl_clip, learning_rate=learning_rate),
        grads_finite,
    )
    shard_sum = None if sharding is None else lambda tensors: assignment.comm.all_reduce_sum(tensors, kind="kl")
    apply_steps(steps, kl_clip, learning_rate, shard_sum, layers[0].weight.device)
