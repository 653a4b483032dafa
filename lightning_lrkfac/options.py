"""Every option of low-rank K-FAC, declared once: default, allowed values, meaning, checkpoint role.

:class:`KFACOptions` is the single declaration. The engine takes it (or its fields as
keywords); the callback's explicit keyword arguments must agree with it (a test checks
names, defaults and types, since LightningCLI reads the callback's signature); the README
table is :func:`markdown_table`; the checkpoint signature is :meth:`KFACOptions.signature`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from numbers import Real
from typing import Any

import torch

from .compatibility import DAMPING_MODES, STEP_RULES, STEP_SIZES, UPDATE_NORMS, WORK_DISTRIBUTIONS, check
from .schedules import Schedule

FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Check:
    """A validity test and the words that describe what passes it."""

    allowed: str
    test: Callable[[Any], bool]

    def __call__(self, option: str, value: Any) -> None:
        if not self.test(value):
            raise ValueError(f"LowRankKFAC: `{option}` must be {self.allowed}, got {value!r}")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def one_of(*allowed: Any) -> Check:
    return Check("one of " + ", ".join("null" if a is None else repr(a) for a in allowed), lambda v: v in allowed)


def scheduled(check: Check) -> Check:
    """A number passing ``check``, or a callable of the step whose value at step 0 passes it."""

    def test(value: Any) -> bool:
        if callable(value):
            try:
                return check.test(value(0))
            except Exception:  # a schedule that cannot be evaluated is not valid
                return False
        return check.test(value)

    return Check(f"{check.allowed}, or a schedule (callable of the step) giving one", test)


POSITIVE_INT = Check("a positive integer", lambda v: _integer(v) and v > 0)
NON_NEGATIVE_INT = Check("an integer ≥ 0", lambda v: _integer(v) and v >= 0)
POSITIVE = Check("a finite number > 0", lambda v: _number(v) and v > 0)
DECAY = Check("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
BOOL = Check("true or false", lambda v: isinstance(v, bool))
INTEGER = Check("an integer", _integer)
PATTERNS = Check(
    "a list of module-name glob patterns (or null)",
    lambda v: v is None or (not isinstance(v, str) and all(isinstance(p, str) for p in v)),
)
NAME_OR_NULL = Check("a module name or null", lambda v: v is None or isinstance(v, str))


def option(default: Any, meaning: str, check: Check, *, checkpoint: bool = False) -> Any:
    """A dataclass field carrying its meaning, its check and whether checkpoints must agree on it."""
    return field(default=default, metadata={"meaning": meaning, "check": check, "checkpoint": checkpoint})


@dataclass(frozen=True)
class KFACOptions:
    """The options of :class:`~lightning_lrkfac.LowRankKFAC`, validated on construction."""

    rank: int = option(
        16,
        "eigenpairs kept per factor (k); factors of size ≤ k are kept dense (exact). On both tasks of "
        "benchmarks/defaults.py 8, 16 and 32 took the same steps and 16 the least time (32: 1.20× and 1.26×, 8: 1.05× "
        "and 1.26×)",
        POSITIVE_INT,
        checkpoint=True,
    )
    oversampling: int = option(
        8, "extra sketch columns (p) of the subspace iteration", NON_NEGATIVE_INT, checkpoint=True
    )
    damping: float | Schedule = option(
        1e-2,
        "Tikhonov λ, split between the factors by `damping_mode`. 1e-2: the best of {1e-3, 1e-2, 1e-1} on three of "
        "the four step-rule tasks, and on BERT, where 1e-3 diverges (benchmarks/step_rules.py, tests/test_hf_models.py)",
        scheduled(POSITIVE),
    )
    damping_mode: str = option(
        "pi",
        "`pi`: π-damping of an absolute λ, δ_A = π√λ, δ_B = √λ/π (Martens & Grosse 2015, §6.3); `relative`: each "
        "factor damped relative to its own scale, δ = √λ × its mean eigenvalue (tr/d), so the damping does not "
        "depend on how the loss is reduced or how large the gradients are",
        one_of(*DAMPING_MODES),
    )
    factor_decay: float | Schedule = option(0.95, "EMA decay ρ of the factors", scheduled(DECAY))
    factor_update_interval: int = option(1, "fold a batch into the factors every this many steps", POSITIVE_INT)
    statistics_examples: int | None = option(
        None,
        "at most this many of each batch's examples (its first dimension; per rank and micro-batch) feed the "
        "factors: a contiguous slice that moves every step, made per-example by the whole batch's multiplier, so the "
        "estimate stays unbiased; null: all. The statistics' cost grows with their rows (tokens, conv locations) and "
        "the rest of K-FAC's step does not: a cap keeps the curvature's cost flat as the batch grows",
        Check("a positive integer or null", lambda v: v is None or POSITIVE_INT.test(v)),
    )
    basis_update_interval: int = option(
        10, "refresh the low-rank bases / eigendecompositions every this many steps", POSITIVE_INT
    )
    warmup_steps: int = option(0, "steps that only collect statistics before preconditioning", NON_NEGATIVE_INT)
    kl_clip: float | Schedule | None = option(
        1e-3,
        "scale the step so that Σ η_g²⟨P, G⟩ ≤ kl_clip, η_g the learning rate of each parameter's group "
        "(Ba et al. 2017); null disables",
        Check(f"null or {scheduled(POSITIVE).allowed}", lambda v: v is None or scheduled(POSITIVE).test(v)),
    )
    step_size: str = option(
        "optimizer",
        "`optimizer`: the optimizer's learning rate and momentum scale the direction; `auto`: every step is αP + μs "
        "(P the direction, s the previous step) with α, μ minimising the exact Gauss–Newton quadratic model of the "
        "batch's loss, and `damping` (its start) adapts by Levenberg–Marquardt (Martens & Grosse 2015, §6–7). For "
        "`auto` use torch.optim.SGD(lr=1, momentum=0) and kl_clip null; it costs a backward with its graph and two "
        "Jacobian products per step (no extra forward), and a forward on the same batch each adaptation; "
        "`normalized`: the direction is the step rule's on a Nesterov momentum (`momentum`) of each handled layer's "
        "gradient, and each layer's update [W b] has a set norm (`update_norm`), as Muon's has; use "
        "torch.optim.SGD(lr, momentum=0) (its weight_decay is then decoupled) or lightning_lrkfac.optim.KFACWithAdamW "
        "(AdamW on the parameters the engine does not handle), and kl_clip null",
        one_of(*STEP_SIZES),
    )
    momentum: float = option(
        0.95, "for `normalized`: β of the Nesterov momentum of the handled gradients (Muon's default)", DECAY
    )
    update_norm: str = option(
        "muon",
        "for `normalized`: each layer's ‖[W b] update‖_F; `muon`: √min(m,n)·√max(1, m/n) for an m×n gradient matrix "
        "(torch's Muon: its learning rate transfers); `rms`: 0.2·√(m·n), AdamW's typical RMS 0.2 (Moonlight); "
        "`polar`: the update's polar factor by Muon's Newton–Schulz iteration (5 steps, in float32 or the "
        "gradient's wider dtype), times √max(1, m/n): Muon's orthogonalization of K-FAC's direction (not under FSDP2)",
        one_of(*UPDATE_NORMS),
    )
    damping_adaptation_interval: int = option(
        1,
        "for `auto`: steps T between evaluations of the loss at the new point (a forward on the same batch): "
        "Levenberg–Marquardt moves λ by ω = (19/20)^T, and a step that raised the loss is not taken (λ × 10)",
        POSITIVE_INT,
    )
    min_damping: float = option(1e-6, "for `auto`: the floor of the adapted λ", POSITIVE)
    step_rule: str = option(
        "kfac",
        "the step from the curvature: `kfac` (B⁻¹GA⁻¹); `ekfac` (George et al. 2018: in the kept eigenbasis, divide "
        "by running second moments of per-example gradients, K-FAC on the rest); `soap` (Vyas et al. 2024: Adam in "
        "the kept eigenbasis, diagonal Adam on the rest; its step is Adam's, so pair it with SGD without momentum "
        "at an Adam learning rate, or with lightning_lrkfac.optim.KFACWithAdamW, and kl_clip null)",
        one_of(*STEP_RULES),
        checkpoint=True,
    )
    adam_beta1: float = option(0.9, "for `soap`: Adam's first-moment decay β₁", DECAY)
    adam_beta2: float = option(0.999, "for `soap`: Adam's second-moment decay β₂", DECAY)
    adam_eps: float = option(1e-8, "for `soap`: Adam's ε", POSITIVE)
    isotropic_tail: bool = option(
        False, "A ≈ UΛUᵀ + σ(I − UUᵀ), σ the mean dropped eigenvalue (the trace is exact)", BOOL
    )
    bias_mode: str = option(
        "augment",
        "`augment`: bias as a ones column of A (one block); `separate`: B⁻¹g_b (asdl's convention)",
        one_of("augment", "separate"),
        checkpoint=True,
    )
    weight_sharing: str = option(
        "expand",
        "Linear on (batch, positions…, features): `expand` (each position an example) or `reduce` "
        "(average inputs / sum output grads over positions; batch first)",
        one_of("expand", "reduce"),
        checkpoint=True,
    )
    precondition_embeddings: bool = option(
        True, "also precondition `nn.Embedding`: exact diagonal A (token frequencies), B over the width", BOOL
    )
    precondition_tied_embeddings: bool = option(
        True,
        "also precondition a weight shared by an `nn.Embedding` and an `nn.Linear` head (GPT-2, T5, nanoGPT) as one "
        "block: each use's Kronecker pair balanced, summed, trace-matched (docs/how-it-works.md)",
        BOOL,
    )
    precondition_attention: bool = option(
        False,
        "also precondition `nn.MultiheadAttention`: in_proj as three blocks q/k/v and out_proj as a Linear, through "
        "a forward of hookable pieces swapped in while attached (state_dict keys unchanged)",
        BOOL,
    )
    dense_threshold: int | None = option(
        None,
        "also keep factors of size ≤ this dense (exact); null: 2·(rank + oversampling), the size up to which the exact "
        "Gram costs no more than the sketch (and its diagonal); 0: only factors of size ≤ rank",
        Check("an integer ≥ 0 or null", lambda v: v is None or NON_NEGATIVE_INT.test(v)),
        checkpoint=True,
    )
    include: list[str] | None = option(None, "glob patterns of module names to handle (null: all)", PATTERNS)
    exclude: list[str] | None = option(None, "glob patterns of module names to leave plain", PATTERNS)
    fisher_type: str = option(
        "empirical",
        "`empirical`: B from the training loss's gradients; `mc`: true Fisher, B from a loss on labels "
        "sampled from the model (one extra partial backward, no extra forward)",
        one_of("empirical", "mc"),
        checkpoint=True,
    )
    mc_output_module: str | None = option(
        None,
        "for `mc` and `step_size` `auto`: name of the module whose output is the prediction (null: the model itself)",
        NAME_OR_NULL,
    )
    likelihood: str = option(
        "categorical",
        "for `mc`: `categorical` (logits in the last dim) or `gaussian` (unit variance, regression)",
        one_of("categorical", "gaussian"),
    )
    loss_reduction: str = option("mean", "how the loss reduces over examples", one_of("mean", "sum"))
    factor_dtype: str | None = option(
        None,
        "dtype of the curvature state; null: float64 for float64 layers, else float32 (also under AMP)",
        one_of(None, *FACTOR_DTYPES),
        checkpoint=True,
    )
    seed: int = option(0, "seeds the random initial bases and the Monte-Carlo labels", INTEGER)
    work_distribution: str = option(
        "replicate",
        "under DDP: `replicate` (every rank does every layer) or `layerwise` (one owner per layer, results broadcast)",
        one_of(*WORK_DISTRIBUTIONS),
    )
    skip_non_finite_steps: bool = option(
        True,
        "when any gradient of a step (handled or plain) is inf/NaN, set every gradient to None so that the "
        "optimizer changes nothing, fold nothing, and count the step (`skipped_steps`); one host sync per step. "
        "Under AMP the loss scaler does this instead",
        BOOL,
    )
    log_stats: bool = option(
        True,
        "the callback logs `metrics()` as `lrkfac/*` on the steps the loggers write: damping, "
        "`captured_trace/<layer>/{A,B}`, SPD repairs, skipped updates, ms of curvature work",
        BOOL,
    )

    def __post_init__(self) -> None:
        for spec in fields(self):
            spec.metadata["check"](spec.name, getattr(self, spec.name))
        check("options", self)

    @property
    def dense_size(self) -> int:
        """Factors of this size or less are kept dense: ``dense_threshold``, or 2·(rank + oversampling) when null."""
        threshold = 2 * (self.rank + self.oversampling) if self.dense_threshold is None else self.dense_threshold
        return max(self.rank, threshold)

    def factor_dtype_for(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The curvature state's dtype for a layer: ``factor_dtype`` if set; else float64 for float64 weights and
        float32 otherwise (also under AMP: factors and inverses never run in half precision)."""
        if self.factor_dtype is not None:
            return FACTOR_DTYPES[self.factor_dtype]
        return torch.float64 if weight_dtype == torch.float64 else torch.float32

    def signature(self) -> dict[str, Any]:
        """The options a checkpoint's curvature state depends on: they must match to resume."""
        return {spec.name: getattr(self, spec.name) for spec in fields(self) if spec.metadata["checkpoint"]}


def markdown_table() -> str:
    """The README's option table, generated from :class:`KFACOptions`."""
    lines = ["| option | default | allowed | meaning |", "|---|---|---|---|"]
    for spec in fields(KFACOptions):
        default = "null" if spec.default is None else repr(spec.default).lower().replace("'", "")
        lines.append(f"| `{spec.name}` | {default} | {spec.metadata['check'].allowed} | {spec.metadata['meaning']} |")
    return "\n".join(lines)


def args_docstring() -> str:
    """The options as a Google-style ``Args:`` section (the engine's and the callback's docstrings)."""
    lines = ["Args:"]
    for spec in fields(KFACOptions):
        lines.append(f"    {spec.name}: {spec.metadata['meaning']} ({spec.metadata['check'].allowed}).")
    return "\n".join(lines)
