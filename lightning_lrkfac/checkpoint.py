"""The engine's checkpoint: a versioned dict, checked against the options and layers before anything is loaded.

A state that does not fit (another version, other checkpointed options, other layers or shapes) raises
``ValueError`` naming the entry. Loading before the factors exist is deferred to the build.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from .lowrank import check_tensors

if TYPE_CHECKING:
    from .adaptive import AutomaticStep
    from .layers import KFACLayer
    from .normalized import NormalizedStep
    from .options import KFACOptions
    from .step_rules import StepRule

STATE_VERSION = 3
STATE_KEYS = (
    "version", "options", "steps", "prepared_damping", "layers", "generator", "mc_generator", "skipped_updates",
    "skipped_steps",
)  # fmt: skip


class Checkpointed(Protocol):
    """What of the engine a checkpoint holds."""

    options: KFACOptions
    layers: list[KFACLayer]
    rules: list[StepRule]
    automatic: AutomaticStep | None
    normalized: NormalizedStep | None
    steps: int
    skipped_steps: int
    skipped_updates: Tensor
    prepared_damping: float | None
    generator: torch.Generator
    mc_generator: torch.Generator | None


def save(engine: Checkpointed) -> dict[str, Any]:
    """Everything a resumed run needs to continue as if it had not stopped (the factors built)."""
    return {
        "version": STATE_VERSION,
        "options": engine.options.signature(),
        "steps": engine.steps,
        "prepared_damping": engine.prepared_damping,
        "layers": {
            layer.name: {
                "in_dim": layer.in_dim,
                "out_dim": layer.out_dim,
                "A": layer.a_factor.state_dict(),
                "B": layer.b_factor.state_dict(),
                "rule": {name: value.detach().clone() for name, value in rule.state_tensors().items()},
            }
            for layer, rule in zip(engine.layers, engine.rules)
        },
        "generator": engine.generator.get_state(),
        "mc_generator": None if engine.mc_generator is None else engine.mc_generator.get_state(),
        "skipped_updates": engine.skipped_updates.detach().clone(),
        "skipped_steps": engine.skipped_steps,
        "automatic": None if engine.automatic is None else engine.automatic.state_tensors(),
        "normalized": None if engine.normalized is None else engine.normalized.state_tensors(),
    }


def check_fits(
    state: dict[str, Any], options: KFACOptions, layers: Sequence[KFACLayer], automatic: Any, normalized: Any = None
) -> None:
    """Raise unless ``state`` has this version, these checkpointed options and these layers (checkable unbuilt)."""
    missing = [key for key in STATE_KEYS if key not in state]
    if missing or state["version"] != STATE_VERSION:
        raise ValueError(
            f"LowRankKFAC: the checkpoint's curvature state is incomplete or of another version: missing {missing}, "
            f"version {state.get('version')!r} (this is version {STATE_VERSION})"
        )
    saved_options, current = state["options"], options.signature()
    if saved_options != current:
        raise ValueError(
            f"LowRankKFAC: the checkpoint was saved with options {saved_options}, these are {current}; they must match to resume."
        )
    expected = {layer.name: (layer.in_dim, layer.out_dim) for layer in layers}
    found = {name: (entry.get("in_dim"), entry.get("out_dim")) for name, entry in state["layers"].items()}
    if expected != found:
        raise ValueError(
            f"LowRankKFAC: the checkpoint's layers (name: (in, out)) {found} do not match the model's {expected}."
        )
    if automatic is not None:  # its tensors exist from construction
        check_tensors(automatic.state_tensors(), state.get("automatic"), "automatic")
    saved = state.get("normalized")
    if normalized is not None and not (isinstance(saved, dict) and all(isinstance(t, Tensor) for t in saved.values())):
        raise ValueError(
            "LowRankKFAC: checkpoint entry `normalized` must hold the momenta of step_size='normalized' (a dict of "
            f"tensors), got {type(saved).__name__}"
        )


def restore(engine: Checkpointed, state: dict[str, Any]) -> None:
    """Load a state that :func:`check_fits`, into built factors: every entry is checked before any is loaded."""
    for layer, rule in zip(engine.layers, engine.rules):
        for key, factor in (("A", layer.a_factor), ("B", layer.b_factor)):
            factor.check_state(state["layers"][layer.name].get(key), f"layers.{layer.name}.{key}")
        check_tensors(rule.state_tensors(), state["layers"][layer.name].get("rule"), f"layers.{layer.name}.rule")
    if not isinstance(state["skipped_updates"], Tensor) or state["skipped_updates"].shape != ():
        raise ValueError("LowRankKFAC: checkpoint entry `skipped_updates` must be a 0-dim tensor")
    for layer, rule in zip(engine.layers, engine.rules):
        layer.a_factor.load_state_dict(state["layers"][layer.name]["A"])
        layer.b_factor.load_state_dict(state["layers"][layer.name]["B"])
        for name, tensor in rule.state_tensors().items():
            tensor.copy_(state["layers"][layer.name]["rule"][name])
        rule.after_load()
    engine.steps = int(state["steps"])
    engine.skipped_steps = int(state["skipped_steps"])
    engine.prepared_damping = state["prepared_damping"]  # the inverses were restored as prepared
    engine.generator.set_state(state["generator"])
    if engine.mc_generator is not None and state["mc_generator"] is not None:
        engine.mc_generator.set_state(state["mc_generator"])
    engine.skipped_updates.copy_(state["skipped_updates"])
    if engine.automatic is not None:
        engine.automatic.load_state_tensors(state["automatic"])
    if engine.normalized is not None:
        engine.normalized.load_state_tensors(state["normalized"])
