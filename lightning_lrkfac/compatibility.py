"""Which options, optimizers and layouts go together: the allowed values and one table that every check reads.

Each :class:`Conflict` names the stage at which it can first be seen: ``options`` (construction),
``optimizer`` (the callback's fit start, or :meth:`LowRankKFAC.check_optimizer`), ``fsdp2`` (the strategy at
setup, the sharded weights at build) and ``tied`` (a tied embedding at layer selection). A step rule is
described by its traits, so a check asks what a rule does, never which rule it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepRuleTraits:
    """What a step rule needs of the rest of the run."""

    #: It takes per-example pairs of A's and B's rows (one use per layer: no tied weights).
    paired_rows: bool = False
    #: Its direction is a finished step (Adam's): no optimizer momentum, no KL clip, no automatic step size.
    finished_step: bool = False
    #: It can precondition one rank's row shard under FSDP2.
    shardable: bool = False
    #: It keeps moments that every rank must update alike (replicated work only).
    replicated_state: bool = False


#: The step rules by name (their classes are registered in :mod:`.step_rules`).
STEP_RULES: dict[str, StepRuleTraits] = {
    "kfac": StepRuleTraits(shardable=True),
    "ekfac": StepRuleTraits(paired_rows=True),
    "soap": StepRuleTraits(finished_step=True, replicated_state=True),
}
STEP_SIZES = ("optimizer", "auto", "normalized")
WORK_DISTRIBUTIONS = ("replicate", "layerwise")
DAMPING_MODES = ("pi", "relative")
UPDATE_NORMS = ("muon", "rms", "polar")


def _traits(options: Any) -> StepRuleTraits:
    return STEP_RULES[options.step_rule]


def _automatic(options: Any) -> bool:
    return options.step_size == "auto"


def _normalized(options: Any) -> bool:
    return options.step_size == "normalized"


def _rules_that(keep: Callable[[StepRuleTraits], bool]) -> str:
    """The step rules with a trait, as words: 'kfac', or one of 'kfac', 'ekfac'."""
    names = [repr(name) for name, traits in STEP_RULES.items() if keep(traits)]
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key != "params"}


def _adds_moments(optimizer: Any) -> int | None:
    """The first parameter group whose optimizer adds momentum or rescales the step (None: plain SGD steps, or an
    optimizer that takes the handled parameters' ``.grad`` as the finished step: :class:`.optim.KFACWithAdamW`)."""
    if getattr(optimizer, "takes_finished_steps", False):
        return None
    for index, group in enumerate(optimizer.param_groups):
        if "betas" in group or group.get("momentum", 0) or "alpha" in group or "lr_decay" in group:
            return index
    return None


#: torch.optim.SGD's settings under which θ ← θ − lr·.grad takes ``.grad`` as a finished step, and those of
#: θ ← θ − .grad exactly (the automatic step's).
_FINISHING_SGD = {"momentum": 0, "nesterov": False, "maximize": False}
_PLAIN_SGD = {"lr": 1.0, "weight_decay": 0, **_FINISHING_SGD}


def _sgd_differences(optimizer: Any, wanted: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """(group index, what differs) unless the optimizer is torch.optim.SGD with the ``wanted`` settings in every group."""
    import torch

    for index, group in enumerate(optimizer.param_groups):
        wrong = {key: group.get(key) for key, value in wanted.items() if group.get(key, value) != value}
        if not isinstance(optimizer, torch.optim.SGD) or wrong:
            return index, wrong or _settings(group)
    return None


def _not_finishing_sgd(optimizer: Any) -> tuple[int, dict[str, Any]] | None:
    """(group index, what differs) unless the optimizer takes ``.grad`` as the finished step: torch.optim.SGD with
    momentum 0 (any lr and weight decay), or :class:`~lightning_lrkfac.optim.KFACWithAdamW`."""
    if getattr(optimizer, "takes_finished_steps", False):
        return None
    return _sgd_differences(optimizer, _FINISHING_SGD)


def _not_plain_sgd(optimizer: Any) -> tuple[int, dict[str, Any]] | None:
    """(group index, what differs) unless every group is torch.optim.SGD(lr=1, momentum=0, weight_decay=0)."""
    return _sgd_differences(optimizer, _PLAIN_SGD)


@dataclass(frozen=True)
class Conflict:
    """A combination that cannot work: when it can first be seen, the test, and the words that explain it."""

    stage: str
    broken: Callable[[Any, Any], bool]  # (options, subject) → True when the combination is present
    message: Callable[[Any, Any], str]


CONFLICTS: tuple[Conflict, ...] = (
    Conflict(
        "options",
        lambda o, _: _traits(o).finished_step and o.kl_clip is not None,
        lambda o, _: (
            f"`step_rule`={o.step_rule!r} takes Adam's normalised step, which the KL clip does not bound; "
            f"set `kl_clip` to null (got {o.kl_clip!r}) or use step_rule {_rules_that(lambda traits: not traits.finished_step)}"
        ),
    ),
    Conflict(
        "options",
        lambda o, _: _automatic(o) and o.kl_clip is not None,
        lambda o, _: (
            "`step_size`='auto' chooses the step's length from the quadratic model, which the KL clip "
            f"would undo; set `kl_clip` to null (got {o.kl_clip!r})"
        ),
    ),
    Conflict(
        "options",
        lambda o, _: _automatic(o) and _traits(o).finished_step,
        lambda o, _: (
            "`step_size`='auto' needs a natural-gradient direction: `step_rule` must be "
            f"{_rules_that(lambda traits: not traits.finished_step)}, got {o.step_rule!r}"
        ),
    ),
    Conflict(
        "options",
        lambda o, _: _normalized(o) and o.kl_clip is not None,
        lambda o, _: (
            "`step_size`='normalized' sets each layer's update norm, which the KL clip would rescale; set `kl_clip` "
            f"to null (got {o.kl_clip!r})"
        ),
    ),
    Conflict(
        "options",
        lambda o, _: _normalized(o) and _traits(o).finished_step,
        lambda o, _: (
            "`step_size`='normalized' preconditions a momentum of the gradient: `step_rule` must be "
            f"{_rules_that(lambda traits: not traits.finished_step)}, got {o.step_rule!r}"
        ),
    ),
    Conflict(
        "options",
        lambda o, _: _automatic(o) and callable(o.damping),
        lambda o, _: (
            "with `step_size`='auto' Levenberg–Marquardt adapts λ: `damping` must be a number (its "
            f"start), got the schedule {o.damping!r}"
        ),
    ),
    Conflict(
        "options",
        lambda o, _: _automatic(o) and not callable(o.damping) and o.damping < o.min_damping,
        lambda o, _: f"`damping` ({o.damping!r}) must be ≥ `min_damping` ({o.min_damping!r}) with `step_size`='auto'",
    ),
    Conflict(
        "options",
        lambda o, _: _traits(o).replicated_state and o.work_distribution != "replicate",
        lambda o, _: (
            f"`step_rule`={o.step_rule!r} keeps Adam moments on every rank: `work_distribution` must be "
            f"'replicate', got {o.work_distribution!r}"
        ),
    ),
    Conflict(
        "optimizer",
        lambda o, optimizer: _traits(o).finished_step and _adds_moments(optimizer) is not None,
        lambda o, optimizer: (
            f"step_rule={o.step_rule!r} already applies Adam's moments; use torch.optim.SGD with "
            "momentum=0 (its lr is then Adam's) or lightning_lrkfac.optim.KFACWithAdamW (AdamW on the parameters "
            f"the engine does not handle), got {type(optimizer).__name__} with param group "
            f"{_adds_moments(optimizer)}: {_settings(optimizer.param_groups[_adds_moments(optimizer)])}"
        ),
    ),
    Conflict(
        "optimizer",
        lambda o, optimizer: _automatic(o) and _not_plain_sgd(optimizer) is not None,
        lambda o, optimizer: (
            "`step_size`='auto' chooses the step size and momentum itself; use "
            "torch.optim.SGD(params, lr=1.0, momentum=0, weight_decay=0), got "
            f"{type(optimizer).__name__} with param group {' '.join(map(str, _not_plain_sgd(optimizer)))}"
        ),
    ),
    Conflict(
        "optimizer",
        lambda o, optimizer: _normalized(o) and _not_finishing_sgd(optimizer) is not None,
        lambda o, optimizer: (
            "`step_size`='normalized' hands the optimizer a finished step (momentum and length are the engine's); use "
            "torch.optim.SGD(params, lr, momentum=0) or lightning_lrkfac.optim.KFACWithAdamW, got "
            f"{type(optimizer).__name__} with param group {' '.join(map(str, _not_finishing_sgd(optimizer)))}"
        ),
    ),
    Conflict(
        "fsdp2",
        lambda o, _: _automatic(o),
        lambda o, _: (
            "`step_size`='auto' needs whole gradients on every rank (a single device or DDP); under FSDP2 "
            "use step_size 'optimizer'"
        ),
    ),
    Conflict(
        "fsdp2",
        lambda o, _: _normalized(o) and o.update_norm == "polar",
        lambda o, _: (
            "`update_norm`='polar' orthogonalizes each layer's whole update, which FSDP2 shards over the ranks; "
            "under FSDP2 use update_norm 'muon' or 'rms'"
        ),
    ),
    Conflict(
        "fsdp2",
        lambda o, _: not _traits(o).shardable or o.work_distribution != "replicate",
        lambda o, _: (
            f"under FSDP2 `step_rule` must be {_rules_that(lambda traits: traits.shardable)} and "
            "`work_distribution` 'replicate', "
            f"got {o.step_rule!r} and {o.work_distribution!r}"
        ),
    ),
    Conflict(
        "tied",
        lambda o, _: _traits(o).paired_rows,
        lambda o, _: f"tied weights under step_rule={o.step_rule!r} (per-example pairs of two uses): not handled",
    ),
)


def conflict(stage: str, options: Any, subject: Any = None) -> str | None:
    """The first conflict of ``stage`` that ``options`` (with ``subject``: the optimizer, …) run into, or None."""
    for entry in CONFLICTS:
        if entry.stage == stage and entry.broken(options, subject):
            return entry.message(options, subject)
    return None


def check(stage: str, options: Any, subject: Any = None, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the first conflict of ``stage``, if any."""
    message = conflict(stage, options, subject)
    if message is not None:
        raise error(f"LowRankKFAC: {message}")
