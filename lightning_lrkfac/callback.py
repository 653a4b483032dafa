"""LowRankKFACCallback: Lightning's hooks mapped onto :class:`~lightning_lrkfac.engine.LowRankKFAC` calls.

The algorithm lives in the engine. What stays here is what only a Trainer knows:
``accumulate_grad_batches``, the precision plugin's loss scaler and the loggers' cadence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from . import compat
from .engine import LowRankKFAC
from .options import KFACOptions, args_docstring
from .schedules import Schedule


class LowRankKFACCallback(Callback):
    """Turns the optimizer step of an automatic-optimization run into a low-rank K-FAC natural-gradient step.

    Every handled ``nn.Linear`` / ``nn.Conv1d/2d/3d`` / ``nn.Embedding`` (and, opt-in, ``nn.MultiheadAttention``) gets
    Kronecker factors A (inputs) and B (output gradients), each kept as a rank-``rank``
    approximation (B: plus its exact diagonal), or dense when small (``dense_threshold``). Before
    each optimizer step the gradient G of the layer is replaced by (B + δ_B I)⁻¹ G (A + δ_A I)⁻¹
    with π-damping (or, with ``step_rule``, by EKFAC's or SOAP's step in the kept eigenbasis);
    the user's optimizer then takes the step. Other parameters keep their plain gradient. The options are those of :class:`~lightning_lrkfac.options.KFACOptions`.
    """

    def __init__(
        self,
        rank: int = 16,
        oversampling: int = 8,
        damping: float | Schedule = 1e-2,
        factor_decay: float | Schedule = 0.95,
        factor_update_interval: int = 1,
        basis_update_interval: int = 10,
        warmup_steps: int = 0,
        kl_clip: float | Schedule | None = 1e-3,
        step_size: str = "optimizer",
        damping_adaptation_interval: int = 1,
        min_damping: float = 1e-6,
        step_rule: str = "kfac",
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_eps: float = 1e-8,
        isotropic_tail: bool = False,
        bias_mode: str = "augment",
        weight_sharing: str = "expand",
        precondition_embeddings: bool = True,
        precondition_tied_embeddings: bool = True,
        precondition_attention: bool = False,
        dense_threshold: int | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        fisher_type: str = "empirical",
        mc_output_module: str | None = None,
        likelihood: str = "categorical",
        loss_reduction: str = "mean",
        factor_dtype: str | None = None,
        seed: int = 0,
        work_distribution: str = "replicate",
        skip_non_finite_steps: bool = True,
        log_stats: bool = True,
    ) -> None:
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        self.options = KFACOptions(**arguments)  # validated here: a bad value fails at construction
        self.engine: LowRankKFAC | None = None
        self._pending_state: dict[str, Any] | None = None
        #: ``step_size="auto"``: the micro-batches of the step being accumulated, to evaluate the loss at the new point.
        self._batches: list[tuple[Any, int]] = []

    @property
    def coverage(self) -> list[dict[str, Any]]:
        """One row per trainable parameter (name, size, whether preconditioned, how): the engine's, after ``setup``."""
        if self.engine is None:
            raise RuntimeError(
                "LowRankKFACCallback.coverage is known once the Trainer has set the callback up (trainer.fit)"
            )
        return self.engine.coverage

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "LowRankKFACCallback needs automatic optimization (`automatic_optimization = True`): it preconditions in `on_before_optimizer_step`, which manual optimization bypasses."
            )
        check_strategy(trainer.strategy)
        if self.options.step_size == "auto" and isinstance(trainer.strategy, ModelParallelStrategy):
            raise RuntimeError(
                "LowRankKFACCallback: `step_size`='auto' needs whole gradients on every rank (a single device or DDP); "
                "under FSDP2 (ModelParallelStrategy) use step_size 'optimizer'"
            )
        if not isinstance(trainer.strategy, ModelParallelStrategy):
            self._create_engine(pl_module)
        # else: `configure_model` builds and shards the layers after this hook; the engine comes at fit start

    def _create_engine(self, pl_module: pl.LightningModule) -> None:
        self.engine = LowRankKFAC(pl_module, self.options)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.engine.load_state_dict(state)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is None:
            self._create_engine(pl_module)
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"LowRankKFACCallback supports exactly one optimizer, the run has {len(trainer.optimizers)}."
            )
        self.engine.check_optimizer(trainer.optimizers[0])
        # The strategy has moved the model by now: the factors are created on its device.
        rank_zero_info(self.engine.coverage_report())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.engine is not None:
            self.engine.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.engine is not None:
            self.engine.close()

    # -- the training step ------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.engine.discard_captured()  # leftovers of a forward that never reached backward
        if self.options.step_size == "auto":
            self._batches.append((batch, batch_idx))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.engine.before_backward(loss, loss_scale=self._loss_scale(trainer))

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning divided every micro-batch's loss by accumulate_grad_batches.
        self.engine.record(accumulation=trainer.accumulate_grad_batches, loss_scale=self._loss_scale(trainer))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        closure = self._training_loss(trainer, pl_module) if self.options.step_size == "auto" else None
        self.engine.step(lr=optimizer, grads_finite=self._scaler_found_no_inf(trainer, optimizer), loss_closure=closure)
        self._batches = []
        if self.options.log_stats and compat.logger_writes_this_step(trainer):
            self._log(pl_module)

    # -- what only the Trainer knows ----------------------------------------------------------
    @staticmethod
    def _scaler(trainer: pl.Trainer) -> Any:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _loss_scale(self, trainer: pl.Trainer) -> float | Tensor:
        """The AMP loss scale the backward ran with (a device tensor: no host sync), else 1."""
        scaler = self._scaler(trainer)
        if scaler is None:
            return 1.0
        scale = compat.scaler_scale_tensor(scaler)
        return scale if scale is not None else float(scaler.get_scale())

    def _scaler_found_no_inf(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """False (a device tensor) when the AMP scaler's unscale_ found inf/NaN gradients; None without a scaler."""
        scaler = self._scaler(trainer)
        found = compat.scaler_found_inf(scaler, optimizer) if scaler is not None else []
        if not found:
            return None
        device = self.engine.skipped_updates.device
        return torch.stack([flag.to(device) for flag in found]).sum() == 0

    def _training_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[], Tensor | None]:
        """The step's loss re-evaluated by ``training_step`` on its micro-batches, as Lightning backpropagated it
        (each divided by ``accumulate_grad_batches``), with logging muted; None if a ``training_step`` skips."""
        batches, accumulation = list(self._batches), trainer.accumulate_grad_batches

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

    def _log(self, pl_module: pl.LightningModule) -> None:
        """The engine's metrics as ``lrkfac/*`` through ``pl_module.log`` (so any Lightning logger gets them).

        Called only on the steps the loggers write: ``log`` costs about 0.2 ms per metric.
        """
        metrics = {f"lrkfac/{name}": value for name, value in self.engine.metrics().items()}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {} if self.engine is None else self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.engine is None:
            self._pending_state = state_dict  # handed to the engine at setup
        else:
            self.engine.load_state_dict(state_dict)


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


LowRankKFACCallback.__doc__ += "\n" + "\n".join("    " + line for line in args_docstring().splitlines()) + "\n"
