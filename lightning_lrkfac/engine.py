"""LowRankKFAC: low-rank K-FAC natural-gradient preconditioning for any PyTorch training loop.

Nothing here knows about Lightning. Call :meth:`LowRankKFAC.step` between ``backward()``
and ``optimizer.step()``: it folds the captured statistics into the factors, refreshes
the low-rank bases on schedule and replaces each handled gradient by its damped natural
gradient (B + δ_B)⁻¹ G (A + δ_A)⁻¹. Under ``torch.distributed`` it sums the statistics
over ranks and can spread the per-layer work (``work_distribution="layerwise"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .adaptive import AutomaticStep, check_plain_sgd, loss_at_update
from .capture import ActivationCapture
from .coverage import coverage_rows, format_coverage
from .distributed import Communicator, balanced_owners
from .fisher import sampled_negative_log_likelihood
from .fused import FusedKroneckerStep
from .layers import KFACLayer, select_layers
from .lowrank import DiagPlusLowRankFactor, check_tensors, fold_groups
from .options import FACTOR_DTYPES, KFACOptions, args_docstring
from .preconditioner import kl_clip_scale
from .schedules import as_schedule
from .sharding import ShardedPreconditioner, detect_sharding, local_tensor
from .step_rules import EigenAdamRule, EKFACRule, StepRule

STATE_VERSION = 3
STATE_KEYS = (
    "version", "options", "steps", "prepared_damping", "layers", "generator", "mc_generator", "skipped_updates",
    "skipped_steps",
)  # fmt: skip


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

    Construction selects the layers (:attr:`skipped_modules` says why the others stay plain)
    and installs the capture hooks; :meth:`close` (or leaving a ``with`` block) removes them.
    The factors are created on each layer's device at the first :meth:`record`/:meth:`step`
    (or :meth:`build`), so move the model first. Gradient accumulation and the AMP loss
    scale are arguments of :meth:`record`/:meth:`step`; ``fisher_type="mc"`` also needs
    :meth:`before_backward` before each ``backward()``.
    """

    def __init__(self, model: nn.Module, options: KFACOptions | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("LowRankKFAC: pass either `options` or keyword options, not both")
        self.options = options if options is not None else KFACOptions(**kwargs)
        self.model = model
        self.layers, self.skipped_modules = select_layers(model, self.options)
        if not self.layers:
            raise ValueError(
                f"LowRankKFAC found nothing to precondition in {type(model).__name__}: it handles nn.Linear, nn.Conv1d/2d/3d, nn.Embedding (precondition_embeddings) and nn.MultiheadAttention (precondition_attention) "
                f"with trainable weights; `include`={self.options.include!r}, `exclude`={self.options.exclude!r}, skipped: {self.skipped_modules}"
            )
        self.damping = as_schedule(self.options.damping)
        self.factor_decay = as_schedule(self.options.factor_decay)
        self.kl_clip = None if self.options.kl_clip is None else as_schedule(self.options.kl_clip)
        self.steps = 0
        self.generator = torch.Generator().manual_seed(self.options.seed)
        self.mc_generator: torch.Generator | None = None
        self.skipped_updates: Tensor | None = None
        #: Steps whose gradients were not finite (skip_non_finite_steps): nothing changed on them.
        self.skipped_steps = 0
        #: Host seconds spent in record() and step() so far (on CUDA: launch time, kernels run async).
        self.curvature_seconds = 0.0
        self.comm = Communicator()
        #: Under FSDP2: the step for the layers whose weights are sharded DTensors (None otherwise).
        self.sharding: ShardedPreconditioner | None = None
        self.owners: list[int] = []
        self.rules: list[StepRule] = []
        self._coverage: list[dict[str, Any]] = []
        self._built = False
        self._pending_state: dict[str, Any] | None = None
        self._prepared_damping: float | None = None
        self._last_step = {"preconditioned": False, "seconds": 0.0, "damping": float(self.damping(0))}
        for layer in self.layers:
            layer.attach()
        hooked = {name: module for layer in self.layers for name, module in layer.hooked_modules().items()}
        self.capture = ActivationCapture(hooked, self._prediction_module(), self.options.fisher_type == "mc")
        self.capture.attach()
        self.capture.enabled = self.factor_update_due(0)
        #: ``step_size="auto"``: the Gauss–Newton products, the previous update and the adapted λ.
        self.automatic = AutomaticStep.for_model(model, self.options)
        self.capture.always_predict = self.automatic is not None

    def _prediction_module(self) -> nn.Module | None:
        """The module whose output is the prediction: the Monte-Carlo loss samples from it and the automatic
        step's Gauss–Newton products go through it (None when neither is on)."""
        if self.options.fisher_type != "mc" and self.options.step_size != "auto":
            return None
        name = self.options.mc_output_module
        if name is None:
            return self.model
        modules = dict(self.model.named_modules())
        if name not in modules:
            raise ValueError(
                f"LowRankKFAC: `mc_output_module` must name a submodule of {type(self.model).__name__}, "
                f"got {name!r}; handled layers: {[layer.name for layer in self.layers]}"
            )
        return modules[name]

    # -- lifetime -----------------------------------------------------------------------
    def build(self) -> None:
        """Create the factors on each layer's current device (idempotent), then apply any loaded state."""
        if self._built:
            return
        options = self.options
        for layer in self.layers:
            layer.build_factors(
                options.rank,
                options.oversampling,
                options.dense_size,
                options.isotropic_tail,
                self.generator,
                self._factor_dtype(layer),
            )
        self.rules = [self._make_rule(layer) for layer in self.layers]
        self.comm = Communicator.from_default_group()
        self.sharding = detect_sharding(self.model, self.layers, self.comm, options)
        if self.automatic is not None:
            if self.sharding is not None:
                raise ValueError(
                    "LowRankKFAC: `step_size`='auto' needs whole gradients on every rank (data parallel); under FSDP2 "
                    "use step_size 'optimizer'"
                )
            if self.comm.active:  # DDP: G's products and the losses come from each rank's part of the batch
                self.automatic.average = partial(self.comm.all_reduce_mean, kind="automatic step")
        if options.work_distribution == "layerwise":
            self.owners = balanced_owners([layer.work_cost() for layer in self.layers], self.comm.world_size)
        else:
            self.owners = [self.comm.rank] * len(self.layers)
        self._coverage = coverage_rows(self.model, self.layers, self.skipped_modules)
        device = self.layers[0].weight.device
        self.skipped_updates = torch.zeros((), dtype=torch.int64, device=device)
        if options.fisher_type == "mc":
            self.mc_generator = torch.Generator(device=device).manual_seed(options.seed + 1)
        self._built = True
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._restore(state)

    def _make_rule(self, layer: KFACLayer) -> StepRule:
        options = self.options
        if options.step_rule == "ekfac":
            return EKFACRule(layer)
        if options.step_rule == "soap":
            return EigenAdamRule(layer, options.adam_beta1, options.adam_beta2, options.adam_eps)
        return StepRule(layer)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``step_rule="soap"`` and ``step_size="auto"`` hand the optimizer a finished step: it must not add momentum
        or rescale it."""
        if self.options.step_size == "auto":
            check_plain_sgd(optimizer)
        if self.options.step_rule != "soap":
            return
        for index, group in enumerate(optimizer.param_groups):
            if "betas" in group or group.get("momentum", 0) or "alpha" in group or "lr_decay" in group:
                raise ValueError(
                    f"LowRankKFAC: step_rule='soap' already applies Adam's moments; use torch.optim.SGD with momentum=0 "
                    f"(its lr is then Adam's), got {type(optimizer).__name__} with param group {index}: "
                    f"{ {k: v for k, v in group.items() if k != 'params'} }"
                )

    def _factor_dtype(self, layer: KFACLayer) -> torch.dtype:
        """``factor_dtype`` if set; else float64 for float64 weights and float32 otherwise (also under AMP)."""
        if self.options.factor_dtype is not None:
            return FACTOR_DTYPES[self.options.factor_dtype]
        return torch.float64 if layer.weight.dtype == torch.float64 else torch.float32

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
        """Call it after the forward and before ``backward()`` (with the AMP loss scale if the loss is scaled).

        ``fisher_type="mc"``: backpropagate a loss on sampled labels to the handled outputs (one partial
        backward, no extra forward). ``step_size="auto"``: ``loss`` is required; build the graphs of the
        Gauss–Newton products through the captured prediction (a backward that keeps its graph).
        No-op when neither is on.
        """
        sampling = self.options.fisher_type == "mc" and self.capture.enabled
        if self.automatic is not None:
            if loss is None:
                raise ValueError(
                    "LowRankKFAC.before_backward: `step_size`='auto' needs the loss: before_backward(loss)"
                )
            self.build()
            self.automatic.record(loss, self.capture.predictions, loss_scale)
        if not sampling:
            self.capture.predictions.clear()  # whatever was recorded for the automatic step is in its graphs now
            return
        self.build()
        sampled_loss = partial(
            sampled_negative_log_likelihood, likelihood=self.options.likelihood, generator=self.mc_generator
        )
        self.capture.backpropagate(sampled_loss, scale=loss_scale)

    def record(self, accumulation: int = 1, loss_scale: float | Tensor = 1.0) -> None:
        """Add what the last forward/backward captured to the pending statistics (one micro-batch).

        ``accumulation``: the number of micro-batches the loss was divided by (gradient
        accumulation); ``loss_scale``: the AMP loss scale of the backward (a tensor is fine:
        no host sync). :meth:`step` records whatever is left, so a loop without
        accumulation need not call this.
        """
        if self.capture.predictions:
            raise RuntimeError(
                "LowRankKFAC: fisher_type='mc' and step_size='auto' need `before_backward()` between the forward and "
                "`backward()`."
            )
        if not self.capture.enabled:
            return
        started = time.perf_counter()
        self.build()
        options = self.options

        def per_example_grad(examples: float) -> float | Tensor:
            """Turns a recorded output gradient into one example's own (the MC loss is a plain sum)."""
            if options.fisher_type == "mc":
                return 1.0 / loss_scale
            return accumulation * (examples if options.loss_reduction == "mean" else 1.0) / loss_scale

        for layer, rule in zip(self.layers, self.rules):
            layer.record(self.capture.pop, per_example_grad, rule if rule.wants_rows else None)
        self.curvature_seconds += time.perf_counter() - started

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
        """Fold, refresh on schedule and precondition every handled gradient in place.

        ``lr``: the learning rate for the KL clip, one number or the optimizer (each
        parameter then uses its group's rate); needed only while ``kl_clip`` is on.
        ``grads_finite``: a bool tensor, False when an AMP scaler found inf/NaN gradients
        this step; then no statistics are folded.
        ``loss_closure`` (``step_size="auto"``): returns the loss of this step's batch at the
        current parameters, like the loss given to :meth:`before_backward` (summed over
        micro-batches); called without gradients, at the new point, on the steps that adapt λ.
        Without it λ stays at ``damping``.
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
        if grads_finite is None and options.skip_non_finite_steps and not self._gradients_finite():
            self._skip_step(started)
            return
        if self.factor_update_due(step):
            self.fold_statistics(float(self.factor_decay(step)), grads_finite)
        damping = self.current_damping(step)
        if step % options.basis_update_interval == 0 or self.bases_pending():
            self.refresh_bases(damping)
        elif damping != self._prepared_damping:
            self.prepare_inverses(damping)
        applied = step >= options.warmup_steps and any(layer.ready for layer in self.layers)
        if self.automatic is not None:
            self._automatic_step(applied, grads_finite, loss_closure)
        elif applied:
            self.precondition(None if kl_clip is None else self._learning_rates(lr), kl_clip, grads_finite)
        self._end_step(started, applied, damping)

    def current_damping(self, step: int) -> float:
        """λ at ``step``: the schedule's, or under ``step_size="auto"`` the adapted one."""
        return self.automatic.lm.damping if self.automatic is not None else float(self.damping(step))

    def _automatic_step(
        self, applied: bool, grads_finite: Tensor | None, loss_closure: Callable[[], Tensor | float | None] | None
    ) -> None:
        """P = K-FAC's direction (the plain gradient before the factors are ready), then αP + μs into ``.grad``;
        on the adaptation steps, λ from the loss at the new point."""
        automatic = self.automatic
        if not automatic.recorded:
            raise RuntimeError(
                "LowRankKFAC: step_size='auto' needs `before_backward(loss)` between the forward and `backward()`"
            )
        raw = [None if p.grad is None else p.grad.detach().clone() for p in automatic.params]
        if applied:
            self.precondition(None, None, grads_finite)
        automatic.combine(raw, grads_finite)
        if loss_closure is not None and automatic.lm.due(self.steps):
            new_loss = loss_at_update(automatic.params, loss_closure)
            if new_loss is not None:
                automatic.adapt(new_loss)  # a rejected step leaves .grad zero: the optimizer stays
        automatic.end_step()

    def _end_step(self, started: float, preconditioned: bool, damping: float) -> None:
        self.steps += 1
        self.capture.clear()  # nothing captured outlives its step
        self.capture.enabled = self.factor_update_due(self.steps)
        seconds = time.perf_counter() - started
        self.curvature_seconds += seconds
        self._last_step = {"preconditioned": preconditioned, "seconds": seconds, "damping": damping}

    def _gradients_finite(self) -> bool:
        """Whether every gradient of the model is finite: one fused norm per dtype, one host sync."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grads = [g.coalesce().values() if g.is_sparse else local_tensor(g) for g in grads]  # sparse: their entries
        if not grads:
            return True
        norms = torch.stack([norm.to(torch.float32) for norm in torch._foreach_norm(grads)])
        bad = (~norms.isfinite()).sum().to(torch.float32)
        if self.sharding is not None:  # each rank saw its shards: every rank must skip alike
            self.comm.all_reduce_sum([bad], kind="checks")
        return not bool(bad)

    def _skip_step(self, started: float) -> None:
        """A step with inf/NaN gradients: no parameter, optimizer state or curvature state changes.

        The gradients become None, which torch optimizers skip (no update, no momentum or
        Adam state change, no weight decay); the step's statistics are dropped.
        """
        for parameter in self.model.parameters():
            parameter.grad = None
        for layer, rule in zip(self.layers, self.rules):
            for factor in layer.factors:
                factor.discard_pending()
            rule.discard_pending()
        if self.automatic is not None:
            self.automatic.end_step()
        self.skipped_steps += 1
        self._end_step(started, False, self._last_step["damping"])

    def discard_captured(self) -> None:
        """Drop what was captured but not recorded yet, e.g. after an exception aborted a step."""
        self.capture.clear()

    def fold_statistics(self, decay: float, grads_finite: Tensor | None = None) -> None:
        """EMA-fold each layer's pending statistics; a layer with non-finite ones is skipped and counted.

        When ``grads_finite`` is False no layer folds, so a step the AMP scaler skips leaves
        no trace in the curvature.
        """
        # One flat all-reduce of every pending sum: each rank then folds the global batch.
        # Every rank runs the same number of micro-batches (a DistributedSampler's shards).
        pending = [t for layer in self.layers for f in layer.factors for t in f.pending_tensors()]
        self.comm.all_reduce_sum(pending + [t for rule in self.rules for t in rule.pending_tensors()])
        world_size = self.comm.world_size
        folding = [
            (layer, rule) for layer, rule in zip(self.layers, self.rules) if all(f.pending_count for f in layer.factors)
        ]
        if not folding:
            return
        taken = fold_groups([list(layer.factors) for layer, _ in folding], decay, grads_finite, world_size)
        self.skipped_updates += (~taken).sum()  # non-finite statistics give a non-finite next state
        for index, (_, rule) in enumerate(folding):
            rule.fold(decay, rule.pending_count * world_size, taken[index])

    def bases_ready(self) -> bool:
        """True once every factor has an eigen-approximation to precondition with."""
        return all(layer.ready for layer in self.layers)

    def bases_pending(self) -> bool:
        """True while some factor has statistics but no eigen-approximation yet (refresh it now)."""
        return any(factor.initialized and not factor.refreshed for layer in self.layers for factor in layer.factors)

    def owns(self, index: int) -> bool:
        """Whether this rank does layer ``index``'s refresh and preconditioning."""
        return self.owners[index] == self.comm.rank

    def refresh_bases(self, damping: float) -> None:
        """Refresh the factors of the owned layers; under layerwise work, owners broadcast the new bases."""
        for index, layer in enumerate(self.layers):
            if self.owns(index):
                for factor in layer.factors:
                    if factor.initialized:
                        factor.refresh()
                if layer.ready:
                    layer.prepare_inverses(damping)
                    self.rules[index].rebase()
        if self.options.work_distribution == "layerwise" and self.comm.active:
            groups = [[t for f in layer.factors if f.initialized for t in f.basis_tensors()] for layer in self.layers]
            self.comm.broadcast_from_owners(groups, self.owners, kind="bases")
            for index, layer in enumerate(self.layers):
                if not self.owns(index):
                    for factor in layer.factors:
                        factor.refreshed = factor.refreshed or factor.initialized
                    if layer.ready:  # k×k work: keeps every rank's state (and checkpoint) consistent
                        layer.prepare_inverses(damping)
                        self.rules[index].rebase()
        self._prepared_damping = damping

    def prepare_inverses(self, damping: float) -> None:
        """Re-prepare every ready layer's damped inverses at a new damping (k×k work; every rank)."""
        for layer in self.layers:
            if layer.ready:
                layer.prepare_inverses(damping)
        self._prepared_damping = damping

    def _learning_rates(self, lr: float | torch.optim.Optimizer | None) -> Callable[[Tensor], float]:
        """Parameter → its learning rate: the group's rate for an optimizer, else the one number (or 0)."""
        if hasattr(lr, "param_groups"):
            rates = {id(p): float(group["lr"]) for group in lr.param_groups for p in group["params"]}
            return lambda parameter: rates.get(id(parameter), 0.0)
        value = 0.0 if lr is None else float(lr)
        return lambda parameter: value

    def precondition(
        self, learning_rate: Callable[[Tensor], float] | None, kl_clip: float | None, grads_finite: Tensor | None = None
    ) -> None:
        """Replace each handled gradient by (B + δ_B)⁻¹ G (A + δ_A)⁻¹, then apply the optional KL clip
        (``learning_rate`` maps a parameter to its rate; needed only with the clip).

        Under layerwise work each owner computes its layers' directions and broadcasts them;
        the KL clip then sums over all layers on every rank, so every rank takes the same step.
        ``grads_finite`` (AMP) False: rules that keep moments (SOAP) leave them unchanged.
        Plain K-FAC on a large low-rank layer is planned first and written into ``.grad`` in
        place once the clip's scale is known (:mod:`.fused`); the other layers write their directions.
        """
        layerwise = self.options.work_distribution == "layerwise" and self.comm.active
        work: list[tuple[int, list[Tensor], list[Tensor]]] = []
        fused: list[tuple[KFACLayer, FusedKroneckerStep]] = []
        sharded: list[int] = []
        for index, layer in enumerate(self.layers):
            if not layer.ready:  # no statistics yet (e.g. never called): plain gradient
                continue
            if self.sharding is not None and index in self.sharding:  # FSDP2: this rank's rows (:mod:`.sharding`)
                sharded.append(index)
                continue
            # Plain K-FAC on a low-rank layer: planned from small projections, written into .grad in place.
            plan = None
            if layer.fusable and not layerwise:
                plan = self.rules[index].fused_step(self._inner_products(layer, kl_clip, learning_rate))
            if plan is not None:
                fused.append((layer, plan))
                continue
            grad = layer.grad_matrix()
            if grad is None:
                continue
            bias = layer.separate_bias_grad()
            grads = [grad.to(layer.dtype)] + ([] if bias is None else [bias.to(layer.dtype)])
            if self.owns(index):
                naturals = self.rules[index].precondition(grads, self._prepared_damping, grads_finite)
            else:
                naturals = [torch.empty_like(g) for g in grads]
            work.append((index, grads, naturals))
        if layerwise:
            self.comm.broadcast_from_owners(
                [naturals for _, _, naturals in work], [self.owners[index] for index, _, _ in work], kind="gradients"
            )
        shard_work = self.sharding.precondition(sharded) if sharded else []
        scale = None
        if kl_clip is not None and (work or fused or shard_work):
            budget = sum(
                self._kl_term(self.layers[index], grads, naturals, learning_rate) for index, grads, naturals in work
            ) + sum(self._fused_kl_term(layer, plan, learning_rate) for layer, plan in fused)
            if self.sharding is not None:  # the shards' terms summed over the ranks (a 0-dim tensor either way)
                shard_budget = torch.zeros((), dtype=torch.float64, device=self.skipped_updates.device)
                for index, grad, natural in shard_work:
                    shard_budget = shard_budget + self._kl_term(self.layers[index], [grad], [natural], learning_rate)
                self.comm.all_reduce_sum([shard_budget], kind="kl")
                budget = budget + shard_budget
            scale = kl_clip_scale(kl_clip, 1.0, budget)
        for index, _, natural in shard_work:
            self.sharding.write(index, natural, scale)
        for index, _, naturals in work:
            self.layers[index].write_grads(naturals[0], naturals[1] if len(naturals) > 1 else None, scale)
        for _, plan in fused:
            plan.apply(scale)

    @staticmethod
    def _inner_products(
        layer: KFACLayer, kl_clip: float | None, learning_rate: Callable[[Tensor], float] | None
    ) -> str:
        """What the KL clip needs of a fused layer: nothing, one ⟨N, G⟩, or the weight's and bias's apart (own rates)."""
        if kl_clip is None:
            return "none"
        if layer.has_bias and learning_rate(layer.module.bias) != learning_rate(layer.weight):
            return "split"
        return "total"

    @staticmethod
    def _fused_kl_term(layer: KFACLayer, plan: FusedKroneckerStep, learning_rate: Callable[[Tensor], float]) -> Tensor:
        """η_w²⟨P_w, G_w⟩ + η_b²⟨P_b, G_b⟩ from the plan's inner products (one sum when the rates agree)."""
        weight_term, *bias_term = plan.inner_products
        total = learning_rate(layer.weight) ** 2 * weight_term
        return total + learning_rate(layer.module.bias) ** 2 * bias_term[0] if bias_term else total

    @staticmethod
    def _kl_term(
        layer: KFACLayer, grads: list[Tensor], naturals: list[Tensor], learning_rate: Callable[[Tensor], float]
    ) -> Tensor:
        """η_w²⟨P_w, G_w⟩ + η_b²⟨P_b, G_b⟩ with each parameter's own learning rate (one sum when they agree)."""
        weight_rate = learning_rate(layer.weight)
        bias_rate = learning_rate(layer.module.bias) if layer.has_bias else weight_rate
        if bias_rate == weight_rate:
            return weight_rate**2 * sum((natural * grad).sum() for natural, grad in zip(naturals, grads))
        weight_term, bias_term = layer.split_inner_product(naturals, grads)
        return weight_rate**2 * weight_term + bias_rate**2 * bias_term

    # -- reporting -----------------------------------------------------------------------
    def metrics(self) -> dict[str, float | Tensor]:
        """The curvature's health after the last step (device tensors: reading them syncs).

        ``captured_trace/<layer>/A`` is the share of tr A in the kept eigenvalues;
        ``.../B`` is Σ|m_i| / tr B, the weight of the kept off-diagonal part of B.
        """
        self.build()
        repairs = sum(
            (layer.b_factor.repairs for layer in self.layers if isinstance(layer.b_factor, DiagPlusLowRankFactor)),
            torch.zeros((), dtype=torch.int64, device=self.skipped_updates.device),
        )
        metrics: dict[str, float | Tensor] = {
            "damping": self._last_step["damping"],
            "spd_repairs": repairs.float(),
            "skipped_updates": self.skipped_updates.float(),
            "skipped_steps": float(self.skipped_steps),
            "preconditioned": float(self._last_step["preconditioned"]),
            "curvature_ms": 1e3 * self._last_step["seconds"],
        }
        automatic = self.automatic
        if automatic is not None and automatic.coefficients is not None:
            metrics["step_alpha"], metrics["step_momentum"] = automatic.coefficients.float()
            metrics["reduction_ratio"] = automatic.ratio
            metrics["rejected_steps"] = float(automatic.rejections)
        for layer in self.layers:
            metrics[f"captured_trace/{layer.name}/A"] = layer.a_factor.captured_trace().float()
            metrics[f"captured_trace/{layer.name}/B"] = layer.b_factor.captured_trace().float()
        return metrics

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.build()
        return {
            "version": STATE_VERSION,
            "options": self.options.signature(),
            "steps": self.steps,
            "prepared_damping": self._prepared_damping,
            "layers": {
                layer.name: {
                    "in_dim": layer.in_dim,
                    "out_dim": layer.out_dim,
                    "A": layer.a_factor.state_dict(),
                    "B": layer.b_factor.state_dict(),
                    "rule": {name: value.detach().clone() for name, value in rule.state_tensors().items()},
                }
                for layer, rule in zip(self.layers, self.rules)
            },
            "generator": self.generator.get_state(),
            "mc_generator": None if self.mc_generator is None else self.mc_generator.get_state(),
            "skipped_updates": self.skipped_updates.detach().clone(),
            "skipped_steps": self.skipped_steps,
            "automatic": None if self.automatic is None else self.automatic.state_tensors(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the state against these options and layers now; load it (now, or when the factors are built).

        A state that does not fit raises ``ValueError`` naming the entry, before anything is loaded.
        """
        missing = [key for key in STATE_KEYS if key not in state]
        if missing or state["version"] != STATE_VERSION:
            raise ValueError(
                f"LowRankKFAC: the checkpoint's curvature state is incomplete or of another version: missing {missing}, "
                f"version {state.get('version')!r} (this is version {STATE_VERSION})"
            )
        saved_options, current = state["options"], self.options.signature()
        if saved_options != current:
            raise ValueError(
                f"LowRankKFAC: the checkpoint was saved with options {saved_options}, these are {current}; they must match to resume."
            )
        expected = {layer.name: (layer.in_dim, layer.out_dim) for layer in self.layers}
        found = {name: (entry.get("in_dim"), entry.get("out_dim")) for name, entry in state["layers"].items()}
        if expected != found:
            raise ValueError(
                f"LowRankKFAC: the checkpoint's layers (name: (in, out)) {found} do not match the model's {expected}."
            )
        if self.automatic is not None:  # its tensors exist from construction
            check_tensors(self.automatic.state_tensors(), state.get("automatic"), "automatic")
        if self._built:
            self._restore(state)
        else:
            self._pending_state = state

    def _restore(self, state: dict[str, Any]) -> None:
        for layer, rule in zip(self.layers, self.rules):  # check every entry before loading any
            for key, factor in (("A", layer.a_factor), ("B", layer.b_factor)):
                factor.check_state(state["layers"][layer.name].get(key), f"layers.{layer.name}.{key}")
            check_tensors(rule.state_tensors(), state["layers"][layer.name].get("rule"), f"layers.{layer.name}.rule")
        if not isinstance(state["skipped_updates"], Tensor) or state["skipped_updates"].shape != ():
            raise ValueError("LowRankKFAC: checkpoint entry `skipped_updates` must be a 0-dim tensor")
        for layer, rule in zip(self.layers, self.rules):
            layer.a_factor.load_state_dict(state["layers"][layer.name]["A"])
            layer.b_factor.load_state_dict(state["layers"][layer.name]["B"])
            for name, tensor in rule.state_tensors().items():
                tensor.copy_(state["layers"][layer.name]["rule"][name])
            rule.after_load()
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.capture.enabled = self.factor_update_due(self.steps)
        self._prepared_damping = state["prepared_damping"]  # the inverses were restored as prepared
        self.generator.set_state(state["generator"])
        if self.mc_generator is not None and state["mc_generator"] is not None:
            self.mc_generator.set_state(state["mc_generator"])
        self.skipped_updates.copy_(state["skipped_updates"])
        if self.automatic is not None:
            self.automatic.load_state_tensors(state["automatic"])


LowRankKFAC.__doc__ += "\n" + "\n".join("    " + line for line in args_docstring().splitlines()) + "\n"
