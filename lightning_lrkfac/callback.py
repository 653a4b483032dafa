"""LowRankKFACCallback: Lightning's hooks mapped onto :class:`~lightning_lrkfac.engine.LowRankKFAC` calls.

The algorithm lives in the engine. What stays here is what only a Trainer knows: ``accumulate_grad_batches``,
the precision plugin's loss scaler, the strategy and the loggers' cadence (read through :mod:`.trainer_support`).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import ModelParallelStrategy
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from . import compat
from .capture import check_no_cuda_graphs
from .compatibility import check
from .engine import LowRankKFAC
from .options import KFACOptions, args_docstring
from .trainer_support import check_strategy, loss_scale, scaler_found_no_inf, training_loss


class LowRankKFACCallback(Callback):
    """Turns the optimizer step of an automatic-optimization run into a low-rank K-FAC natural-gradient step.

    Every handled ``nn.Linear`` / ``nn.Conv1d/2d/3d`` / ``nn.Embedding`` (and, opt-in, ``nn.MultiheadAttention``) gets
    Kronecker factors A (inputs) and B (output gradients), each kept as a rank-``rank``
    approximation (B: plus its exact diagonal), or dense when small (``dense_threshold``). Before
    each optimizer step the gradient G of the layer is replaced by (B + δ_B I)⁻¹ G (A + δ_A I)⁻¹
    with π-damping (or, with ``step_rule``, by EKFAC's or SOAP's step in the kept eigenbasis);
    the user's optimizer then takes the step. Other parameters keep their plain gradient. The options are those
    of :class:`~lightning_lrkfac.options.KFACOptions`, as keyword arguments (LightningCLI reads them from the
    signature, which is made from that one declaration).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = KFACOptions(**options)  # validated here: a bad value fails at construction
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
        check_no_cuda_graphs(pl_module, trainer.strategy.root_device)  # again at fit start, after configure_model
        if isinstance(trainer.strategy, ModelParallelStrategy):  # FSDP2: `configure_model` shards after this hook,
            check("fsdp2", self.options, error=RuntimeError)  # so the engine comes at fit start
        else:
            self._create_engine(pl_module)

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
        self.engine.before_backward(loss, loss_scale=loss_scale(trainer))

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning divided every micro-batch's loss by accumulate_grad_batches.
        self.engine.record(accumulation=trainer.accumulate_grad_batches, loss_scale=loss_scale(trainer))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        closure = training_loss(trainer, pl_module, self._batches) if self.options.step_size == "auto" else None
        finite = scaler_found_no_inf(trainer, optimizer, self.engine.skipped_updates.device)
        self.engine.step(lr=optimizer, grads_finite=finite, loss_closure=closure)
        self._batches = []
        if self.options.log_stats and compat.logger_writes_this_step(trainer):
            self._log(pl_module)

    def _log(self, pl_module: pl.LightningModule) -> None:
        """The engine's metrics as ``lrkfac/*`` through ``pl_module.log`` (any Lightning logger gets them); called
        only on the steps the loggers write: ``log`` costs about 0.2 ms per metric."""
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


def _options_signature() -> inspect.Signature:
    """``__init__(self, *, <every option of KFACOptions with its default and type>)``, for LightningCLI and help."""
    hints = typing.get_type_hints(KFACOptions)
    keyword = inspect.Parameter.KEYWORD_ONLY
    options = [
        inspect.Parameter(spec.name, keyword, default=spec.default, annotation=hints[spec.name])
        for spec in dataclasses.fields(KFACOptions)
    ]
    return inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *options])


LowRankKFACCallback.__init__.__signature__ = _options_signature()
LowRankKFACCallback.__doc__ += "\n" + "\n".join("    " + line for line in args_docstring().splitlines()) + "\n"
