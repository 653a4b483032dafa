"""What the engine reports: the coverage table (which parameters are preconditioned, how, at what rank) and the
curvature's health after each step (the callback logs it as ``lrkfac/*``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .layers import KFACLayer, parameter_holders, plain_reason


def coverage_rows(model: nn.Module, layers: list[KFACLayer], skipped: dict[str, str]) -> list[dict[str, Any]]:
    """One row per trainable parameter: name, size, whether preconditioned, how, factor ranks."""
    handled = {}
    for layer in layers:
        how = f"K-FAC {layer.describe()}, A {layer.a_factor.describe()}, B {layer.b_factor.describe()}"
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


@dataclass
class StepSummary:
    """What the last step did: whether it preconditioned, its host seconds, the damping it used."""

    preconditioned: bool
    seconds: float
    damping: float


def curvature_metrics(
    layers: Sequence[KFACLayer],
    last_step: StepSummary,
    skipped_updates: Tensor,
    skipped_steps: int,
    extra: dict[str, float | Tensor],
) -> dict[str, float | Tensor]:
    """The last step's damping, whether it preconditioned and its ms; the skipped updates and steps and the SPD
    repairs so far; ``extra`` (the automatic step's); and per layer ``captured_trace/<layer>/A`` (the share of tr A
    in the kept eigenvalues) and ``.../B`` (Σ|m_i| / tr B, the weight of the kept off-diagonal part of B).
    Device tensors: reading them syncs."""
    repairs = [f.repairs for layer in layers for f in layer.factors if f.repairs is not None]
    zero = torch.zeros((), dtype=torch.int64, device=skipped_updates.device)
    metrics: dict[str, float | Tensor] = {
        "damping": last_step.damping,
        "spd_repairs": sum(repairs, zero).float(),
        "skipped_updates": skipped_updates.float(),
        "skipped_steps": float(skipped_steps),
        "preconditioned": float(last_step.preconditioned),
        "curvature_ms": 1e3 * last_step.seconds,
        **extra,
    }
    for layer in layers:
        metrics[f"captured_trace/{layer.name}/A"] = layer.a_factor.captured_trace().float()
        metrics[f"captured_trace/{layer.name}/B"] = layer.b_factor.captured_trace().float()
    return metrics
