"""LowRankKFAC: low-rank K-FAC natural-gradient preconditioning for any PyTorch training loop.

Nothing here knows about Lightning. :meth:`LowRankKFAC.step`, between ``backward()`` and ``optimizer.step()``, is the
algorithm: record the captured rows, fold them into the factors, refresh the low-rank bases on schedule, and apply
each handled layer's damped natural gradient (B + δ_B)⁻¹ G (A + δ_A)⁻¹. Each stage lives in a module of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint
from .adaptive import AutomaticStep
from .apply import precondition_layers
from .assignment import WorkAssignment
from .capture import ActivationCapture, check_no_cuda_graphs, prediction_module
from .compatibility import check
from .distributed import Communicator
from .fisher import sampled_negative_log_likelihood
from .layer_steps import learning_rates
from .layers import select_layers
from .normalized import NormalizedStep
from .options import KFACOptions, args_docstring
from .preconditioner import DAMPING_SPLITS
from .reporting import StepSummary, coverage_rows, curvature_metrics, format_coverage
from .schedules import as_schedule
from .sharding import ShardedPreconditioner, detect_sharding
from .statistics import drop_step, fold_layers, gradients_finite, per_example_multiplier, record_layers
from .step_rules import StepRule, make_rule


class LowRankKFAC:
    """Low-rank K-FAC for the ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` layers of ``model``
    (and, opt-in, ``nn.MultiheadAttention``).

    ::

        kfac = LowRankKFAC(model, rank=32, damping=1e-3)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            kfac.step(lr=optimizer)   # the KL clip uses each parameter group's learning rate
            optimizer.step()

    Construction selects the layers (:attr:`skipped_modules` says why the others stay plain) and installs the
    capture hooks; :meth:`close` (or leaving a ``with`` block) removes them. The factors are created on each
    layer's device at the first :meth:`record`/:meth:`step` (or :meth:`build`), so move the model first.
    ``fisher_type="mc"`` and ``step_size="auto"`` also need :meth:`before_backward` before each ``backward()``.
    """

    def __init__(self, model: nn.Module, options: KFACOptions | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("LowRankKFAC: pass either `options` or keyword options, not both")
        self.options = options = options if options is not None else KFACOptions(**kwargs)
        self.model = model
        self.layers, self.skipped_modules = select_layers(model, options)
        if not self.layers:
            raise ValueError(f"LowRankKFAC found nothing to precondition in {type(model).__name__}: it handles nn.Linear, nn.Conv1d/2d/3d, nn.Embedding (precondition_embeddings) and nn.MultiheadAttention (precondition_attention) with trainable weights; `include`={options.include!r}, `exclude`={options.exclude!r}, skipped: {self.skipped_modules}")  # fmt: skip
        check_no_cuda_graphs(model, self.layers[0].weight.device)  # again at build, on the training device
        self.damping, self.factor_decay = as_schedule(options.damping), as_schedule(options.factor_decay)
        self.damping_split = DAMPING_SPLITS[options.damping_mode]
        self.kl_clip = None if options.kl_clip is None else as_schedule(options.kl_clip)
        self.steps = self.skipped_steps = 0  # skipped: steps whose gradients were not finite (nothing changed)
        self.generator = torch.Generator().manual_seed(options.seed)
        self.mc_generator: torch.Generator | None = None
        #: Host seconds spent in record() and step() so far (on CUDA: launch time, kernels run async).
        self.curvature_seconds = 0.0
        # Made at the first build, once the model is on its device and any process group is up:
        self.rules: list[StepRule] = []
        self.comm: Communicator | None = None
        self.assignment: WorkAssignment | None = None
        self.sharding: ShardedPreconditioner | None = None  # FSDP2: the layers whose weights are sharded
        self.skipped_updates: Tensor | None = None  # layers' statistics skipped for not being finite
        self.prepared_damping: float | None = None
        self._coverage: list[dict[str, Any]] = []
        self._pending_state: dict[str, Any] | None = None
        self.last_step = StepSummary(False, 0.0, float(self.damping(0)))
        for layer in self.layers:
            layer.attach()
        hooked = {name: module for layer in self.layers for name, module in layer.hooked_modules().items()}
        predicting = options.fisher_type == "mc" or options.step_size == "auto"  # the MC loss, G's products
        handled = [layer.name for layer in self.layers]
        prediction = prediction_module(model, options.mc_output_module, handled) if predicting else None
        self.capture = ActivationCapture(hooked, prediction, options.fisher_type == "mc").attach()
        self.capture.enabled = self.factor_update_due(0)
        # The step sizes that keep state: ``auto``'s products, previous update and λ; ``normalized``'s momenta.
        self.automatic = AutomaticStep.for_model(model, options)
        self.normalized = NormalizedStep.for_options(self.layers, options)
        self.capture.always_predict = self.automatic is not None

    # -- lifetime -----------------------------------------------------------------------
    def build(self) -> None:
        """Create the factors on each layer's current device (idempotent), then apply any loaded state."""
        if self.rules:
            return
        options = self.options
        check_no_cuda_graphs(self.model, self.layers[0].weight.device)
        for layer in self.layers:
            dtype = options.factor_dtype_for(layer.weight.dtype)
            layer.build_factors(
                options.rank, options.oversampling, options.dense_size, options.isotropic_tail, self.generator, dtype
            )
        self.rules = [make_rule(layer, options) for layer in self.layers]
        self.comm = Communicator.from_default_group()
        self.sharding = detect_sharding(self.model, self.layers, self.comm, options)
        if self.automatic is not None and self.comm.active:  # DDP: G's products and the losses of each rank's part
            self.automatic.average = partial(self.comm.all_reduce_mean, kind="automatic step")
        self.assignment = WorkAssignment.create(options.work_distribution, self.comm, self.layers)
        self._coverage = coverage_rows(self.model, self.layers, self.skipped_modules)
        device = self.layers[0].weight.device
        self.skipped_updates = torch.zeros((), dtype=torch.int64, device=device)
        if options.fisher_type == "mc":
            self.mc_generator = torch.Generator(device=device).manual_seed(options.seed + 1)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._restore(state)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise if the optimizer cannot take this engine's step (``soap``, ``auto`` and ``normalized`` hand it a
        finished step); tell one that takes finished steps (:class:`.optim.KFACWithAdamW`) which parameters get them."""
        check("optimizer", self.options, optimizer)
        if hasattr(optimizer, "take_finished_steps"):
            optimizer.take_finished_steps([p for layer in self.layers for p in layer.parameters()])

    def close(self) -> None:
        """Remove the capture hooks (and any swapped-in forward) and drop anything captured; the curvature state stays."""
        self.capture.detach()
        for layer in self.layers:
            layer.detach()

    def __enter__(self) -> LowRankKFAC:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def coverage(self) -> list[dict[str, Any]]:
        """One row per trainable parameter: name, size, whether preconditioned, how (factors built first)."""
        self.build()
        return self._coverage

    def coverage_report(self) -> str:
        """Every trainable parameter, how it is treated, and the share preconditioned."""
        return format_coverage(self.coverage)

    # -- statistics ----------------------------------------------------------------------
    def factor_update_due(self, step: int) -> bool:
        return step % self.options.factor_update_interval == 0

    def before_backward(self, loss: Tensor | None = None, loss_scale: float | Tensor = 1.0) -> None:
        """After the forward, before ``backward()`` (with the AMP loss scale if the loss is scaled). ``mc``: backpropagate
        a loss on sampled labels to the handled outputs (a partial backward). ``auto``: build the graphs of the
        Gauss–Newton products through the prediction (``loss`` required). No-op when neither is on."""
        self.build()
        if self.automatic is not None:
            self.automatic.record(loss, self.capture.predictions, loss_scale)
        if not (self.options.fisher_type == "mc" and self.capture.enabled):
            self.capture.predictions.clear()  # whatever was recorded for the automatic step is in its graphs now
            return
        likelihood, generator = self.options.likelihood, self.mc_generator
        sampled_loss = partial(sampled_negative_log_likelihood, likelihood=likelihood, generator=generator)
        self.capture.backpropagate(sampled_loss, scale=loss_scale)

    def record(self, accumulation: int = 1, loss_scale: float | Tensor = 1.0) -> None:
        """Add what the last forward/backward captured to the pending statistics (one micro-batch). ``accumulation``:
        the micro-batches the loss was divided by; ``loss_scale``: the backward's AMP scale (a tensor: no host sync).
        :meth:`step` records whatever is left, so a loop without accumulation need not call this."""
        if self.capture.predictions:
            raise RuntimeError(
                "LowRankKFAC: fisher_type='mc' and step_size='auto' need `before_backward()` between the forward and "
                "`backward()`."
            )
        if not self.capture.enabled:
            return
        started = time.perf_counter()
        self.build()
        scale = per_example_multiplier(self.options, accumulation, loss_scale)  # makes an output grad one example's
        record_layers(self.layers, self.rules, self.capture.pop, scale, self.options.statistics_examples, self.steps)
        self.curvature_seconds += time.perf_counter() - started

    def fold_statistics(self, decay: float, grads_finite: Tensor | None = None) -> None:
        """EMA-fold the pending statistics of the global batch (:func:`.statistics.fold_layers`); count the skipped."""
        skipped = fold_layers(self.layers, self.rules, self.comm, decay, grads_finite)
        if skipped is not None:
            self.skipped_updates += skipped  # non-finite statistics give a non-finite next state

    def discard_captured(self) -> None:
        """Drop what was captured but not recorded yet, e.g. after an exception aborted a step."""
        self.capture.clear()

    # -- the step ------------------------------------------------------------------------
    def step(
        self,
        lr: float | torch.optim.Optimizer | None = None,
        *,
        accumulation: int = 1,
        loss_scale: float | Tensor = 1.0,
        grads_finite: Tensor | None = None,
        loss_closure: Callable[[], Tensor | float | None] | None = None,
    ) -> None:
        """Record → fold → refresh on schedule → apply: every handled gradient becomes its rule's step, in place.

        ``lr``: the KL clip's learning rate, a number or the optimizer (each parameter's group rate); needed only
        while ``kl_clip`` is on. ``grads_finite``: a bool tensor, False when an AMP scaler found inf/NaN gradients
        (nothing folds). ``loss_closure`` (``step_size="auto"``): the loss of this step's batch at the current
        parameters, summed over micro-batches as given to :meth:`before_backward`; called without gradients at the
        new point on the steps that adapt λ (without it λ stays at ``damping``).
        """
        started = time.perf_counter()
        self.build()  # first: a checkpoint loaded before the build sets the step counter
        step, options = self.steps, self.options
        kl_clip = None if self.kl_clip is None else float(self.kl_clip(step))
        if kl_clip is not None and lr is None:
            raise ValueError(
                "LowRankKFAC.step: the KL clip is on (`kl_clip` is set), so `lr` must be given: "
                "the optimizer (per-group rates) or a number; or construct with kl_clip=None."
            )
        self.record(accumulation, loss_scale)
        if grads_finite is None and options.skip_non_finite_steps and self._skip_if_not_finite(started):
            return
        if self.factor_update_due(step):
            self.fold_statistics(float(self.factor_decay(step)), grads_finite)
        damping = self.automatic.marquardt.damping if self.automatic is not None else float(self.damping(step))
        if step % options.basis_update_interval == 0 or self.bases_pending():  # on the ranks owning each layer
            self.assignment.refresh(self.layers, self.rules, damping, self.damping_split)
        elif damping != self.prepared_damping:  # k×k work, every rank
            self.assignment.prepare(self.layers, damping, self.damping_split)
        self.prepared_damping = damping
        applied = step >= options.warmup_steps and any(layer.ready for layer in self.layers)
        apply = partial(precondition_layers, self.layers, self.rules, self.assignment, self.sharding, damping)
        direction = partial(apply, None, None, grads_finite) if applied else None  # the rule's, no clip
        if self.automatic is not None:  # then αP + μs
            self.automatic.step(direction, grads_finite, loss_closure, step)
        elif self.normalized is not None:  # of the momentum, then each layer's norm set
            self.normalized.step(direction, grads_finite, self.comm)
        elif applied:
            apply(None if kl_clip is None else learning_rates(lr), kl_clip, grads_finite)
        self._end_step(started, StepSummary(applied, 0.0, damping))

    def bases_ready(self) -> bool:
        """True once every factor has an eigen-approximation to precondition with."""
        return all(layer.ready for layer in self.layers)

    def bases_pending(self) -> bool:
        """True while some factor has statistics but no eigen-approximation yet (refresh it now)."""
        return any(factor.initialized and not factor.refreshed for layer in self.layers for factor in layer.factors)

    def _end_step(self, started: float, summary: StepSummary) -> None:
        self.steps += 1
        self.capture.clear()  # nothing captured outlives its step
        self.capture.enabled = self.factor_update_due(self.steps)
        summary.seconds = time.perf_counter() - started
        self.curvature_seconds += summary.seconds
        self.last_step = summary

    def _skip_if_not_finite(self, started: float) -> bool:
        """A step with inf/NaN gradients (one host sync to know) changes no parameter, optimizer or curvature state."""
        shards = None if self.sharding is None else partial(self.comm.all_reduce_sum, kind="checks")
        if gradients_finite(self.model.parameters(), shards):
            return False
        drop_step(self.model.parameters(), self.layers, self.rules)
        if self.automatic is not None:
            self.automatic.end_step()
        self.skipped_steps += 1
        self._end_step(started, StepSummary(False, 0.0, self.last_step.damping))
        return True

    # -- reporting and checkpoints ---------------------------------------------------------
    def metrics(self) -> dict[str, float | Tensor]:
        """The curvature's health after the last step (:func:`.reporting.curvature_metrics`; reading them syncs)."""
        self.build()
        automatic = {} if self.automatic is None else self.automatic.metrics()
        return curvature_metrics(self.layers, self.last_step, self.skipped_updates, self.skipped_steps, automatic)

    def state_dict(self) -> dict[str, Any]:
        self.build()
        return checkpoint.save(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the state against the options and layers now (``ValueError`` naming the entry), then load it now
        or when the factors are built."""
        checkpoint.check_fits(state, self.options, self.layers, self.automatic, self.normalized)
        if self.rules:
            self._restore(state)
        else:
            self._pending_state = state

    def _restore(self, state: dict[str, Any]) -> None:
        checkpoint.restore(self, state)
        self.capture.enabled = self.factor_update_due(self.steps)


LowRankKFAC.__doc__ += "\n" + "\n".join("    " + line for line in args_docstring().splitlines()) + "\n"
