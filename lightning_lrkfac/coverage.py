"""The coverage report: which parameters the callback preconditions, how, and at what rank."""

from __future__ import annotations

from typing import Any

from torch import nn

from .layers import KFACLayer, parameter_holders, plain_reason
from .lowrank import DenseFactor, DiagonalFactor, KroneckerFactor


def _describe(factor: KroneckerFactor) -> str:
    if isinstance(factor, DenseFactor):
        return f"dense {factor.groups}×{factor.dim}" if factor.groups > 1 else f"dense {factor.dim}"
    if isinstance(factor, DiagonalFactor):
        return f"diagonal {factor.dim}"
    return f"rank {factor.rank}/{factor.dim}"


def coverage_rows(model: nn.Module, layers: list[KFACLayer], skipped: dict[str, str]) -> list[dict[str, Any]]:
    """One row per trainable parameter: name, size, whether preconditioned, how, factor ranks."""
    handled = {}
    for layer in layers:
        how = f"K-FAC {layer.describe()}, A {_describe(layer.a_factor)}, B {_describe(layer.b_factor)}"
        handled[id(layer.module.weight)] = how
        if layer.has_bias:
            handled[id(layer.module.bias)] = how + (", bias augmented" if layer.augment else ", bias B⁻¹g")
    holders = parameter_holders(model)
    modules = dict(model.named_modules())
    rows = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        how = handled.get(id(parameter))
        if how is None:
            holder = holders[id(parameter)][-1]
            reason = skipped.get(holder) or plain_reason(modules[holder]) or "not a weight of a handled module type"
            how = f"plain gradient ({reason})"
        rows.append(
            {"parameter": name, "numel": parameter.numel(), "preconditioned": id(parameter) in handled, "how": how}
        )
    return rows


def format_coverage(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table, with the share of parameters preconditioned."""
    total = sum(row["numel"] for row in rows) or 1
    covered = sum(row["numel"] for row in rows if row["preconditioned"])
    width = max([len(row["parameter"]) for row in rows] + [9])
    lines = [f"LowRankKFAC coverage: {covered:,} of {total:,} parameters preconditioned ({covered / total:.1%})"]
    lines += [f"  {row['parameter']:<{width}}  {row['numel']:>10,}  {row['how']}" for row in rows]
    return "\n".join(lines)
