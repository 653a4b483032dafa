"""Statistics into the factors: each micro-batch's captured rows added to the pending sums, then the EMA fold.

Every pending sum is linear in the statistics, so micro-batches add up and data-parallel ranks combine by one flat
all-reduce before the fold: each rank then folds the global batch. A layer whose statistics are not finite keeps
its state (skipped and counted), so one bad batch never poisons the curvature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .distributed import local_tensor
from .lowrank import fold_groups

if TYPE_CHECKING:
    from .distributed import Communicator
    from .layers import KFACLayer
    from .options import KFACOptions
    from .step_rules import StepRule


def per_example_multiplier(
    options: KFACOptions, accumulation: int, loss_scale: float | Tensor
) -> Callable[[float], float | Tensor]:
    """examples → the factor that turns a recorded output gradient of a loss averaged over ``examples`` (and divided
    by ``accumulation`` micro-batches, scaled by the AMP ``loss_scale``) into one example's own. The MC loss is a
    plain sum."""

    def multiplier(examples: float) -> float | Tensor:
        if options.fisher_type == "mc":
            return 1.0 / loss_scale
        return accumulation * (examples if options.loss_reduction == "mean" else 1.0) / loss_scale

    return multiplier


Pop = Callable[[nn.Module], tuple[list[Tensor], list[Tensor]]]


def record_layers(
    layers: Sequence[KFACLayer],
    rules: Sequence[StepRule],
    pop: Pop,
    per_example_grad: Callable[[float], float | Tensor],
    examples: int | None = None,
    step: int = 0,
) -> None:
    """Each layer takes its captured rows into its factors (of at most ``examples`` of each call's examples:
    :func:`example_slice`); a rule that wants per-example pairs gets them."""
    for layer, rule in zip(layers, rules):
        layer_pop, layer_grad = (pop, per_example_grad)
        if examples is not None:
            layer_pop, layer_grad = example_slice(layer, pop, per_example_grad, examples, step)
        paired = layer.record(layer_pop, layer_grad, rule.row_bases())
        if paired is not None:
            rule.accumulate_rows(*paired)


def example_slice(
    layer: KFACLayer, pop: Pop, per_example_grad: Callable[[float], float | Tensor], limit: int, step: int
) -> tuple[Pop, Callable[[float], float | Tensor]]:
    """``pop`` keeping at most ``limit`` of the N examples of each batched call (the first dimension of its input and
    output gradient, a view: a slice that moves with ``step``), and the per-example multiplier of the whole batch.

    The loss averaged over all N examples, so a kept row's output gradient is made per-example by N's multiplier,
    while each factor's weight (1/rows) averages over the kept rows: an unbiased estimate from fewer rows."""
    examples = [0, 0]  # every call's examples (as the layer counts them) before and after the slice

    def sliced(module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        inputs, grads = pop(module)
        if len(inputs) != len(grads):
            return inputs, grads
        kept_inputs, kept_grads = [], []
        for x, g in zip(inputs, grads):
            examples[0] += layer.num_samples(g)
            total = x.shape[0] if layer.batched(x) and x.shape[0] == g.shape[0] else 0
            keep = min(total, limit)
            if 0 < keep < total:
                start = (step * keep) % (total - keep + 1)
                x, g = x.narrow(0, start, keep), g.narrow(0, start, keep)
            examples[1] += layer.num_samples(g)
            kept_inputs.append(x)
            kept_grads.append(g)
        return kept_inputs, kept_grads

    def whole_batch(kept: float) -> float | Tensor:
        return per_example_grad(kept * examples[0] / examples[1] if examples[1] else kept)

    return sliced, whole_batch


def fold_layers(
    layers: Sequence[KFACLayer],
    rules: Sequence[StepRule],
    comm: Communicator,
    decay: float,
    grads_finite: Tensor | None = None,
) -> Tensor | None:
    """Sum the pending statistics over the ranks and EMA-fold them; returns how many layers were skipped for
    non-finite statistics (a 0-dim tensor; None when nothing was pending). ``grads_finite`` False: nothing folds."""
    pending = [t for layer in layers for f in layer.factors for t in f.pending_tensors()]
    comm.all_reduce_sum(pending + [t for rule in rules for t in rule.pending_tensors()])
    folding = [(layer, rule) for layer, rule in zip(layers, rules) if all(f.pending_count for f in layer.factors)]
    if not folding:
        return None
    taken = fold_groups([list(layer.factors) for layer, _ in folding], decay, grads_finite, comm.world_size)
    for index, (_, rule) in enumerate(folding):
        rule.fold(decay, rule.pending_count * comm.world_size, taken[index])
    return (~taken).sum()


def gradients_finite(
    parameters: Iterable[Tensor], sum_over_ranks: Callable[[list[Tensor]], None] | None = None
) -> bool:
    """Whether every gradient is finite (a sparse one: its entries; a DTensor: this rank's part): one fused norm per
    dtype, one host sync. ``sum_over_ranks``: each rank saw only its shards, so every rank must decide alike."""
    grads = [p.grad for p in parameters if p.grad is not None]
    grads = [g.coalesce().values() if g.is_sparse else local_tensor(g) for g in grads]
    if not grads:
        return True
    norms = torch.stack([norm.to(torch.float32) for norm in torch._foreach_norm(grads)])
    bad = (~norms.isfinite()).sum().to(torch.float32)
    if sum_over_ranks is not None:
        sum_over_ranks([bad])
    return not bool(bad)


def drop_step(parameters: Iterable[Tensor], layers: Sequence[KFACLayer], rules: Sequence[StepRule]) -> None:
    """A skipped step leaves no trace: every gradient becomes None (torch optimizers then change nothing, no
    momentum or weight decay either) and every pending statistic is dropped."""
    for parameter in parameters:
        parameter.grad = None
    for layer, rule in zip(layers, rules):
        for factor in layer.factors:
            factor.discard_pending()
        rule.discard_pending()
