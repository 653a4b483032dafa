"""What the callback reads of a Trainer: the strategies it supports, the AMP loss scaler, and the step's loss
re-evaluated by ``training_step`` (the automatic step's Levenberg–Marquardt test). Lightning-only; the engine
never imports it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import Tensor

from . import compat


def amp_scaler(trainer: pl.Trainer) -> Any:
    """The precision plugin's enabled loss scaler (16-mixed), else None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def loss_scale(trainer: pl.Trainer) -> float | Tensor:
    """The AMP loss scale the backward ran with (a device tensor: no host sync), else 1."""
    scaler = amp_scaler(trainer)
    if scaler is None:
        return 1.0
    scale = compat.scaler_scale_tensor(scaler)
    return scale if scale is not None else float(scaler.get_scale())


def scaler_found_no_inf(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, device: torch.device) -> Tensor | None:
    """False (a device tensor) when the AMP scaler's unscale_ found inf/NaN gradients; None without a scaler."""
    scaler = amp_scaler(trainer)
    found = compat.scaler_found_inf(scaler, optimizer) if scaler is not None else []
    if not found:
        return None
    return torch.stack([flag.to(device) for flag in found]).sum() == 0


def training_loss(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batches: Sequence[tuple[Any, int]]
) -> Callable[[], Tensor | None]:
    """The step's loss re-evaluated by ``training_step`` on its micro-batches, as Lightning backpropagated it
    (each divided by ``accumulate_grad_batches``), with logging muted; None if a ``training_step`` skips."""
    batches, accumulation = list(batches), trainer.accumulate_grad_batches

    def evaluate() -> Tensor | None:
        total = None
        with muted_logging(pl_module), trainer.precision_plugin.train_step_context():
            for batch, index in batches:
                output = pl_module.training_step(batch, index)
                loss = output.get("loss") if isinstance(output, Mapping) else output
                if loss is None:
                    return None
                total = loss / accumulation if total is None else total + loss / accumulation
        return total

    return evaluate


@contextmanager
def muted_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside: a re-evaluated ``training_step`` must not log twice."""
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def check_strategy(strategy: Any) -> None:
    """Raise unless the strategy gives the callback parameters and gradients it can precondition and keep state for.

    A single device, DDP, and FSDP2 through ``ModelParallelStrategy`` with ``tensor_parallel_size=1`` (each rank
    preconditions its shards: :mod:`.sharding`). FSDP1 and DeepSpeed flatten parameters; tensor parallelism splits
    layers; ``ddp_spawn``/``fork`` train in child processes whose curvature state never returns;
    ``find_unused_parameters=True`` lets ranks fold different numbers of batches.
    """
    name = type(strategy).__name__
    if type(strategy) is SingleDeviceStrategy:
        return
    if type(strategy) is ModelParallelStrategy:
        tensor_parallel = compat.tensor_parallel_size(strategy)
        if tensor_parallel == 1:
            return
        name += f"(tensor_parallel_size={tensor_parallel!r})"
    if type(strategy) is DDPStrategy:
        start_method = compat.ddp_start_method(strategy)
        if start_method == "popen" and not compat.ddp_finds_unused_parameters(strategy):
            return
        name += (
            f"(start_method={start_method!r}, find_unused_parameters={compat.ddp_finds_unused_parameters(strategy)})"
        )
    raise RuntimeError(
        f"LowRankKFACCallback does not support the strategy {name}: it supports a single device "
        "(strategy='auto' on one device), DDP launched by Lightning or torchrun (strategy='ddp', "
        "find_unused_parameters=False) and FSDP2 as ModelParallelStrategy(data_parallel_size=<devices>, "
        "tensor_parallel_size=1). FSDP1 (FSDPStrategy), DeepSpeed, ddp_spawn/fork and tensor parallelism are not supported."
    )
