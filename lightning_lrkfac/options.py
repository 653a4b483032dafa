"""Validation of the callback's options: every error names the option and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FISHER_TYPES = ("empirical", "mc")
LOSS_REDUCTIONS = ("mean", "sum")
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def require(condition: bool, option: str, allowed: str, value: object) -> None:
    """Raise ``ValueError`` naming ``option``, the allowed values and the value given."""
    if not condition:
        raise ValueError(f"LowRankKFACCallback: `{option}` must be {allowed}, got {value!r}")


def positive_int(option: str, value: object) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, option, "a positive integer", value)


def non_negative_int(option: str, value: object) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, option, "an integer ≥ 0", value)


def positive_float(option: str, value: object) -> None:
    require(
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and float(value) > 0
        and float(value) < float("inf"),
        option,
        "a finite number > 0",
        value,
    )


def one_of(option: str, value: object, allowed: Sequence[str]) -> None:
    require(value in allowed, option, "one of " + ", ".join(repr(a) for a in allowed), value)


def patterns(option: str, value: object) -> None:
    ok = value is None or (not isinstance(value, str) and all(isinstance(p, str) for p in value))
    require(ok, option, "a list of module-name glob patterns (or null)", value)
