"""LowRankKFACCallback: the Lightning hooks that drive low-rank K-FAC. No math lives here."""

from __future__ import annotations

import fnmatch
import time
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn

from . import options as opt
from .capture import ActivationCapture
from .coverage import coverage_rows, format_coverage, parameter_holders
from .distributed import WORK_MODES, Communicator, balanced_owners
from .fisher import LIKELIHOODS, sampled_negative_log_likelihood
from .layers import BIAS_MODES, WEIGHT_SHARING, EmbeddingLayer, KFACLayer
from .lowrank import DiagPlusLowRankFactor, all_finite
from .preconditioner import kl_clip_scale

STATE_VERSION = 1


class LowRankKFACCallback(Callback):
    """Turns the optimizer step of an automatic-optimization run into a K-FAC natural-gradient step.

    Every handled ``nn.Linear`` / ``nn.Conv2d`` (and, optionally, ``nn.Embedding``) gets Kronecker factors A (inputs) and B
    (output gradients), each kept as a rank-``rank`` approximation (B: plus its exact
    diagonal), or dense when ``rank`` ≥ its size. Before each optimizer step the
    gradient G of the layer is replaced by (B + δ_B I)⁻¹ G (A + δ_A I)⁻¹ with π-damping;
    the user's optimizer then takes the step. Other parameters keep their plain gradient.

    Args:
        rank: eigenpairs kept per factor (k). Factors of size ≤ k are kept dense (exact).
        oversampling: extra sketch columns (p) of the subspace iteration.
        damping: Tikhonov damping λ, split between the factors by π-damping.
        factor_decay: EMA decay ρ of the factors, in [0, 1).
        factor_update_interval: fold a batch's statistics every this many optimizer steps.
        basis_update_interval: refresh the low-rank bases (and dense eigendecompositions)
            every this many optimizer steps.
        warmup_steps: optimizer steps that only collect statistics before preconditioning.
        kl_clip: rescale the step so that η² Σ⟨P, G⟩ ≤ kl_clip (Ba et al. 2017); ``None`` disables.
            The default, as in kfac-pytorch, keeps early steps from diverging.
        isotropic_tail: give A's dropped spectrum back as σ(I − UUᵀ), σ = mean tail eigenvalue.
        weight_sharing: for Linear layers on inputs (batch, positions…, features): ``"expand"``
            (every position is an example) or ``"reduce"`` (average inputs and sum output
            gradients over the positions first); Eschenhagen et al. 2023.
        precondition_embeddings: also precondition ``nn.Embedding`` weights, with the exact
            diagonal A of token frequencies and the usual B over the embedding dimension
            (every position an example). ``False`` leaves them on the plain gradient.
        bias_mode: ``"augment"`` (bias as an extra input column, one block) or
            ``"separate"`` (bias gets B⁻¹ g_b, asdl's convention).
        dense_threshold: also keep factors of size ≤ this dense.
        include: glob patterns of module names to handle (default: every Linear/Conv2d).
        exclude: glob patterns of module names to leave on the plain gradient.
        fisher_type: ``"empirical"`` (B from the gradients of the training loss) or ``"mc"``
            (true Fisher: B from the gradients of a loss on labels sampled from the model's
            prediction; one extra partial backward per factor update, no extra forward).
        mc_output_module: name of the module whose output is the prediction for ``"mc"``
            (default: the last handled layer).
        likelihood: the predictive distribution for ``"mc"``: ``"categorical"`` over logits
            in the last dimension, or ``"gaussian"`` (unit variance) for regression.
        loss_reduction: how the training loss reduces over examples, ``"mean"`` or ``"sum"``.
        factor_dtype: ``"float32"`` or ``"float64"`` for all curvature state.
        seed: seeds the random initial bases.
        work_distribution: under data parallelism (Lightning's DDP), ``"replicate"``: every
            rank refreshes and preconditions every layer; ``"layerwise"``: each layer has one
            owner rank (balanced by cost) that does its work and broadcasts the result.
            The statistics are summed over ranks either way.
        log_stats: log damping, captured trace, SPD repairs, skipped updates and time, on
            the steps where the Trainer's loggers write (``log_every_n_steps``).
    """

    def __init__(
        self,
        rank: int = 32,
        oversampling: int = 8,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_update_interval: int = 1,
        basis_update_interval: int = 10,
        warmup_steps: int = 0,
        kl_clip: float | None = 1e-3,
        isotropic_tail: bool = False,
        bias_mode: str = "augment",
        weight_sharing: str = "expand",
        precondition_embeddings: bool = False,
        dense_threshold: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        fisher_type: str = "empirical",
        mc_output_module: str | None = None,
        likelihood: str = "categorical",
        loss_reduction: str = "mean",
        factor_dtype: str = "float32",
        seed: int = 0,
        work_distribution: str = "replicate",
        log_stats: bool = True,
    ) -> None:
        super().__init__()
        opt.positive_int("rank", rank)
        opt.non_negative_int("oversampling", oversampling)
        opt.positive_float("damping", damping)
        opt.require(
            isinstance(factor_decay, (int, float)) and 0.0 <= factor_decay < 1.0,
            "factor_decay",
            "a number in [0, 1)",
            factor_decay,
        )
        opt.positive_int("factor_update_interval", factor_update_interval)
        opt.positive_int("basis_update_interval", basis_update_interval)
        opt.non_negative_int("warmup_steps", warmup_steps)
        if kl_clip is not None:
            opt.positive_float("kl_clip", kl_clip)
        opt.one_of("bias_mode", bias_mode, BIAS_MODES)
        opt.one_of("weight_sharing", weight_sharing, WEIGHT_SHARING)
        opt.require(
            isinstance(precondition_embeddings, bool),
            "precondition_embeddings",
            "true or false",
            precondition_embeddings,
        )
        opt.non_negative_int("dense_threshold", dense_threshold)
        opt.patterns("include", include)
        opt.patterns("exclude", exclude)
        opt.one_of("fisher_type", fisher_type, opt.FISHER_TYPES)
        opt.require(
            mc_output_module is None or isinstance(mc_output_module, str),
            "mc_output_module",
            "a module name or null",
            mc_output_module,
        )
        opt.one_of("likelihood", likelihood, LIKELIHOODS)
        opt.one_of("loss_reduction", loss_reduction, opt.LOSS_REDUCTIONS)
        opt.one_of("factor_dtype", factor_dtype, tuple(opt.FACTOR_DTYPES))
        opt.one_of("work_distribution", work_distribution, WORK_MODES)
        self.rank = rank
        self.oversampling = oversampling
        self.damping = float(damping)
        self.factor_decay = float(factor_decay)
        self.factor_update_interval = factor_update_interval
        self.basis_update_interval = basis_update_interval
        self.warmup_steps = warmup_steps
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.isotropic_tail = isotropic_tail
        self.bias_mode = bias_mode
        self.weight_sharing = weight_sharing
        self.precondition_embeddings = precondition_embeddings
        self.dense_threshold = dense_threshold
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.fisher_type = fisher_type
        self.mc_output_module = mc_output_module
        self.likelihood = likelihood
        self.loss_reduction = loss_reduction
        self.factor_dtype = opt.FACTOR_DTYPES[factor_dtype]
        self.seed = seed
        self.work_distribution = work_distribution
        self.log_stats = log_stats

        self.layers: list[KFACLayer] = []
        self.skipped_modules: dict[str, str] = {}
        self.coverage: list[dict[str, Any]] = []
        self.capture: ActivationCapture | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.mc_generator: torch.Generator | None = None
        self.skipped_updates: Tensor | None = None
        self._pending_state: dict[str, Any] | None = None
        self.comm = Communicator()
        self.owners: list[int] = []

    # -- discovery ------------------------------------------------------------------
    def select_layers(self, model: nn.Module) -> list[KFACLayer]:
        """The modules this callback preconditions; the reasons for the rest go to ``skipped_modules``."""
        layers, self.skipped_modules = [], {}
        # nn.MultiheadAttention passes out_proj's weight to a functional call: its forward never runs.
        functional = {
            f"{name}.out_proj" if name else "out_proj"
            for name, module in model.named_modules()
            if isinstance(module, nn.MultiheadAttention)
        }
        # A parameter held by several modules (tied weights) gets the gradient of all its uses.
        holders = parameter_holders(model)
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                continue
            if self.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
                continue
            tied = sorted({other for p in module.parameters(recurse=False) for other in holders[id(p)]} - {name})
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                self.skipped_modules[name] = "excluded"
            elif isinstance(module, nn.Embedding) and not self.precondition_embeddings:
                self.skipped_modules[name] = "nn.Embedding (precondition_embeddings=False)"
            elif name in functional:
                self.skipped_modules[name] = "weight used functionally by nn.MultiheadAttention"
            elif not module.weight.requires_grad:
                self.skipped_modules[name] = "frozen weight"
            elif tied:
                self.skipped_modules[name] = f"parameter shared with {tied} (tied weights)"
            elif isinstance(module, nn.Conv2d) and module.groups != 1:
                self.skipped_modules[name] = f"groups={module.groups} (only groups=1 is handled)"
            elif isinstance(module, nn.Embedding) and module.sparse:
                self.skipped_modules[name] = "sparse gradients (sparse=True)"
            elif isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                self.skipped_modules[name] = "scale_grad_by_freq=True (its gradient is already frequency-scaled)"
            elif isinstance(module, nn.Embedding):
                layers.append(EmbeddingLayer(name, module))
            else:
                layers.append(KFACLayer(name, module, self.bias_mode, self.weight_sharing))
        return layers

    # -- Lightning hooks --------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "LowRankKFACCallback needs automatic optimization (`automatic_optimization = True`): it preconditions in `on_before_optimizer_step`, which manual optimization bypasses."
            )
        self.layers = self.select_layers(pl_module)
        if not self.layers:
            raise ValueError(
                f"LowRankKFACCallback found nothing to precondition in {type(pl_module).__name__}: it handles nn.Linear, nn.Conv2d (groups=1) and, with precondition_embeddings, nn.Embedding "
                f"with trainable weights; `include`={self.include!r}, `exclude`={self.exclude!r}, skipped: {self.skipped_modules}"
            )
        self.capture = ActivationCapture(
            {layer.name: layer.module for layer in self.layers}, self._prediction_module(pl_module)
        )
        self.capture.attach()

    def _prediction_module(self, pl_module: pl.LightningModule) -> nn.Module | None:
        """The module whose output the Monte-Carlo loss samples from (None for the empirical Fisher)."""
        if self.fisher_type != "mc":
            return None
        if self.mc_output_module is None:
            return self.layers[-1].module
        modules = dict(pl_module.named_modules())
        if self.mc_output_module not in modules:
            raise ValueError(
                f"LowRankKFACCallback: `mc_output_module` must name a submodule of {type(pl_module).__name__}, "
                f"got {self.mc_output_module!r}; handled layers: {[layer.name for layer in self.layers]}"
            )
        return modules[self.mc_output_module]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"LowRankKFACCallback supports exactly one optimizer, the run has {len(trainer.optimizers)}."
            )
        for layer in self.layers:
            layer.build_factors(
                self.rank,
                self.oversampling,
                self.dense_threshold,
                self.isotropic_tail,
                self.generator,
                self.factor_dtype,
            )
        self.comm = Communicator.from_default_group()
        if self.work_distribution == "layerwise":
            self.owners = balanced_owners([layer.work_cost() for layer in self.layers], self.comm.world_size)
        else:
            self.owners = [self.comm.rank] * len(self.layers)
        self.coverage = coverage_rows(pl_module, self.layers, self.skipped_modules)
        rank_zero_info(format_coverage(self.coverage))
        device = self.layers[0].weight.device
        self.skipped_updates = torch.zeros((), dtype=torch.int64, device=device)
        if self.fisher_type == "mc":
            self.mc_generator = torch.Generator(device=device).manual_seed(self.seed + 1)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.capture is not None:
            self.capture.detach()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.capture.enabled = self.factor_update_due(trainer.global_step)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.fisher_type != "mc" or not self.capture.enabled:
            return
        sampled_loss = partial(sampled_negative_log_likelihood, likelihood=self.likelihood, generator=self.mc_generator)
        self.capture.backpropagate(sampled_loss, scale=self._loss_scale(trainer))

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.capture.enabled:
            return
        loss_scale = self._loss_scale(trainer)

        def per_example_grad(examples: float) -> float | Tensor:
            return self._per_example_grad_multiplier(trainer, examples) / loss_scale

        for layer in self.layers:
            inputs, grads = self.capture.pop(layer.module)
            if inputs and grads:
                layer.accumulate(inputs, grads, per_example_grad)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        started = time.perf_counter()
        step = trainer.global_step
        if self.factor_update_due(step):
            self.fold_statistics(self._scaler_found_no_inf(trainer, optimizer))
        if step % self.basis_update_interval == 0 or self.bases_pending():
            self.refresh_bases()
        applied = step >= self.warmup_steps and any(layer.ready for layer in self.layers)
        if applied:
            self.precondition(learning_rate=optimizer.param_groups[0]["lr"])
        if self.log_stats and self._logger_writes_this_step(trainer):
            self._log(pl_module, applied, time.perf_counter() - started)

    # -- the steps ------------------------------------------------------------------------
    def factor_update_due(self, step: int) -> bool:
        return step % self.factor_update_interval == 0

    def fold_statistics(self, step_valid: Tensor | None = None) -> None:
        """EMA-fold each layer's pending statistics; a layer with non-finite ones is skipped and counted.

        ``step_valid`` (a bool tensor) is False when the AMP scaler found inf/NaN gradients and
        skips the optimizer step: then no layer folds, so the step leaves no trace in the curvature.
        """
        # One flat all-reduce of every pending sum: each rank then folds the global batch.
        # Every rank runs the same number of micro-batches (Lightning's DistributedSampler).
        self.comm.all_reduce_sum([t for layer in self.layers for f in layer.factors for t in f.pending_tensors()])
        world_size = self.comm.world_size
        for layer in self.layers:
            a_factor, b_factor = layer.factors
            if a_factor.pending_count == 0 or b_factor.pending_count == 0:
                continue
            a_next = a_factor.blend(self.factor_decay, a_factor.pending_count * world_size)
            b_next = b_factor.blend(self.factor_decay, b_factor.pending_count * world_size)
            valid = all_finite(a_next + b_next)  # non-finite statistics give a non-finite next state
            if step_valid is not None:
                valid = valid & step_valid
            self.skipped_updates += ~valid
            a_factor.commit(a_next, valid)
            b_factor.commit(b_next, valid)

    def bases_ready(self) -> bool:
        """True once every factor has an eigen-approximation to precondition with."""
        return all(layer.ready for layer in self.layers)

    def bases_pending(self) -> bool:
        """True while some factor has statistics but no eigen-approximation yet (refresh it now)."""
        return any(factor.initialized and not factor.refreshed for layer in self.layers for factor in layer.factors)

    def owns(self, index: int) -> bool:
        """Whether this rank does layer ``index``'s refresh and preconditioning."""
        return self.owners[index] == self.comm.rank

    def refresh_bases(self) -> None:
        """Refresh the factors of the owned layers; under layerwise work, owners broadcast the new bases."""
        for index, layer in enumerate(self.layers):
            if self.owns(index):
                for factor in layer.factors:
                    if factor.initialized:
                        factor.refresh()
                if layer.ready:
                    layer.prepare_inverses(self.damping)
        if self.work_distribution == "layerwise" and self.comm.active:
            groups = [[t for f in layer.factors if f.initialized for t in f.basis_tensors()] for layer in self.layers]
            self.comm.broadcast_from_owners(groups, self.owners, kind="bases")
            for index, layer in enumerate(self.layers):
                if not self.owns(index):
                    for factor in layer.factors:
                        factor.refreshed = factor.refreshed or factor.initialized
                    if layer.ready:  # k×k work: keeps every rank's state (and checkpoint) consistent
                        layer.prepare_inverses(self.damping)

    def precondition(self, learning_rate: float) -> None:
        """Replace each handled gradient by (B + δ_B)⁻¹ G (A + δ_A)⁻¹, then apply the optional KL clip.

        Under layerwise work each owner computes its layers' directions and broadcasts them;
        the KL clip then sums over all layers on every rank, so every rank takes the same step.
        """
        work: list[tuple[int, list[Tensor], list[Tensor]]] = []
        for index, layer in enumerate(self.layers):
            grad = layer.grad_matrix()
            if grad is None or not layer.ready:  # no statistics yet (e.g. never called): plain gradient
                continue
            bias = layer.separate_bias_grad()
            grads = [grad.to(self.factor_dtype)] + ([] if bias is None else [bias.to(self.factor_dtype)])
            if self.owns(index):
                naturals = layer.precondition(grads)
            else:
                naturals = [torch.empty_like(g) for g in grads]
            work.append((index, grads, naturals))
        if self.work_distribution == "layerwise" and self.comm.active:
            self.comm.broadcast_from_owners(
                [naturals for _, _, naturals in work], [self.owners[index] for index, _, _ in work], kind="gradients"
            )
        scale = None
        if self.kl_clip is not None and work:
            vg_sum = sum(
                (natural * grad).sum() for _, grads, naturals in work for grad, natural in zip(grads, naturals)
            )
            scale = kl_clip_scale(self.kl_clip, learning_rate, vg_sum)
        for index, _, naturals in work:
            if scale is not None:
                naturals = [natural * scale for natural in naturals]
            self.layers[index].write_grads(naturals[0], naturals[1] if len(naturals) > 1 else None)

    # -- helpers --------------------------------------------------------------------------
    def _per_example_grad_multiplier(self, trainer: pl.Trainer, examples: float) -> float:
        """Factor that turns a recorded output gradient into one example's own gradient.

        The sampled Monte-Carlo loss is a plain sum. The training loss was divided by
        ``accumulate_grad_batches`` (Lightning) and, if mean-reduced, by the examples it averages.
        """
        if self.fisher_type == "mc":
            return 1.0
        return float(trainer.accumulate_grad_batches) * (examples if self.loss_reduction == "mean" else 1.0)

    @staticmethod
    def _scaler(trainer: pl.Trainer) -> Any:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _loss_scale(self, trainer: pl.Trainer) -> float | Tensor:
        """The AMP loss scale the backward ran with (a device tensor: no host sync), else 1."""
        scaler = self._scaler(trainer)
        if scaler is None:
            return 1.0
        loss_scale = getattr(scaler, "_scale", None)
        return loss_scale.to(self.factor_dtype) if isinstance(loss_scale, Tensor) else float(scaler.get_scale())

    def _scaler_found_no_inf(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """False (a device tensor) when the AMP scaler's unscale_ found inf/NaN gradients; None without a scaler."""
        scaler = self._scaler(trainer)
        if scaler is None:
            return None
        found = scaler._per_optimizer_states[id(optimizer)].get("found_inf_per_device", {})
        if not found:
            return None
        return torch.stack([value.to(self.skipped_updates.device) for value in found.values()]).sum() == 0

    @staticmethod
    def _logger_writes_this_step(trainer: pl.Trainer) -> bool:
        """Whether step-level metrics logged now reach the loggers (``log_every_n_steps``).

        Metrics logged on other steps are overwritten unseen, and ``log`` costs about 0.2 ms
        per metric, more than the curvature work of a small layer.
        """
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _log(self, pl_module: pl.LightningModule, applied: bool, seconds: float) -> None:
        """Log the run's curvature health through ``pl_module.log`` (so any Lightning logger gets it).

        ``captured_trace/<layer>/A`` is the share of tr A in the kept eigenvalues;
        ``.../B`` is Σ|m_i| / tr B, the weight of the kept off-diagonal part of B.
        """
        repairs = sum(
            (layer.b_factor.repairs for layer in self.layers if isinstance(layer.b_factor, DiagPlusLowRankFactor)),
            torch.zeros((), dtype=torch.int64, device=self.skipped_updates.device),
        )
        metrics: dict[str, float | Tensor] = {
            "lrkfac/damping": self.damping,
            "lrkfac/spd_repairs": repairs.float(),
            "lrkfac/skipped_updates": self.skipped_updates.float(),
            "lrkfac/preconditioned": float(applied),
            "lrkfac/curvature_ms": 1e3 * seconds,
        }
        for layer in self.layers:
            metrics[f"lrkfac/captured_trace/{layer.name}/A"] = layer.a_factor.captured_trace().float()
            metrics[f"lrkfac/captured_trace/{layer.name}/B"] = layer.b_factor.captured_trace().float()
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # -- checkpointing -------------------------------------------------------------------
    def _options_signature(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "oversampling": self.oversampling,
            "bias_mode": self.bias_mode,
            "dense_threshold": self.dense_threshold,
            "weight_sharing": self.weight_sharing,
            "factor_dtype": str(self.factor_dtype),
            "fisher_type": self.fisher_type,
        }

    def state_dict(self) -> dict[str, Any]:
        if not self.layers or self.layers[0].a_factor is None:
            return {}
        return {
            "version": STATE_VERSION,
            "options": self._options_signature(),
            "layers": {
                layer.name: {
                    "in_dim": layer.in_dim,
                    "out_dim": layer.out_dim,
                    "A": layer.a_factor.state_dict(),
                    "B": layer.b_factor.state_dict(),
                }
                for layer in self.layers
            },
            "generator": self.generator.get_state(),
            "mc_generator": None if self.mc_generator is None else self.mc_generator.get_state(),
            "skipped_updates": self.skipped_updates.detach().clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.layers and self.layers[0].a_factor is not None:
            self._restore(state_dict)
        else:
            self._pending_state = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        saved_options, current = state["options"], self._options_signature()
        if saved_options != current:
            raise ValueError(
                f"LowRankKFACCallback: the checkpoint was saved with options {saved_options}, this callback has {current}; they must match to resume."
            )
        saved_layers = state["layers"]
        expected = {layer.name: (layer.in_dim, layer.out_dim) for layer in self.layers}
        found = {name: (entry["in_dim"], entry["out_dim"]) for name, entry in saved_layers.items()}
        if expected != found:
            raise ValueError(
                f"LowRankKFACCallback: the checkpoint's layers (name: (in, out)) {found} do not match the model's {expected}."
            )
        for layer in self.layers:
            layer.a_factor.load_state_dict(saved_layers[layer.name]["A"])
            layer.b_factor.load_state_dict(saved_layers[layer.name]["B"])
        self.generator.set_state(state["generator"])
        if self.mc_generator is not None and state.get("mc_generator") is not None:
            self.mc_generator.set_state(state["mc_generator"])
        self.skipped_updates.copy_(state["skipped_updates"])
