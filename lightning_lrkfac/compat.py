"""Every read of a private torch or Lightning attribute, each with a fallback.

``tests/test_compat.py`` checks that each attribute still exists on the installed
versions, so an upgrade that removes one fails loudly there instead of silently here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_explicit_padding(module: nn.Module) -> tuple[int, ...]:
    """The (last dim first) padding amounts that a conv applies itself (``padding="same"``, non-zero modes)."""
    padding = getattr(module, "_reversed_padding_repeated_twice", None)
    if padding is not None:
        return tuple(padding)
    # Fallback: the same amounts, computed as torch does for each spatial dim (last first).
    amounts: list[int] = []
    for kernel, dilation, pad in reversed(list(zip(module.kernel_size, module.dilation, _padding_pairs(module)))):
        total = dilation * (kernel - 1) if pad is None else 2 * pad
        amounts += [total // 2, total - total // 2]
    return tuple(amounts)


def _padding_pairs(module: nn.Module) -> list[int | None]:
    """Per-dim symmetric padding, or None where ``padding="same"`` leaves it to be computed."""
    if module.padding == "same":
        return [None] * len(module.kernel_size)
    if module.padding == "valid":
        return [0] * len(module.kernel_size)
    return list(module.padding)


def pad_like_conv(module: nn.Module, inputs: Tensor) -> Tensor:
    """The input padded as the conv pads it before its zero-padding-free core."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(inputs, conv_explicit_padding(module), mode=mode)


def scaler_scale_tensor(scaler: Any) -> Tensor | None:
    """A GradScaler's current scale as the device tensor it keeps (no host sync), or None."""
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else None


def scaler_found_inf(scaler: Any, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The found-inf flags (device tensors) that ``scaler.unscale_(optimizer)`` recorded this step."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return []
    return list(states.get(id(optimizer), {}).get("found_inf_per_device", {}).values())


def logger_writes_this_step(trainer: Any) -> bool:
    """Whether step-level metrics logged now reach the loggers (``log_every_n_steps``); True if unknown."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def ddp_start_method(strategy: Any) -> str:
    """How a DDP strategy starts its processes (``popen``: torchrun / Lightning's launcher; ``spawn``, ``fork``)."""
    return str(getattr(strategy, "_start_method", "popen"))


def ddp_finds_unused_parameters(strategy: Any) -> bool:
    """Whether a DDP strategy was asked for ``find_unused_parameters=True``."""
    return bool(getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False))


def tensor_parallel_size(strategy: Any) -> object:
    """``ModelParallelStrategy``'s tensor-parallel size as resolved at ``setup_environment`` ("auto" before)."""
    return getattr(strategy, "_tensor_parallel_size", "auto")
