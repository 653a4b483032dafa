"""What every preconditioned module has: two factors, its statistics as rows, its gradient as a matrix."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..eigenbasis import Bases, RowPairing, project_rows
from ..lowrank import DenseFactor, DiagPlusLowRankFactor, KroneckerFactor, LowRankFactor
from ..preconditioner import DampingSplit, pi_damping

if TYPE_CHECKING:
    from ..options import KFACOptions

#: One micro-batch's B-rows, their weight and how to pair them with the A-rows in the kept basis (for rules that
#: take per-example statistics, EKFAC).
PairedRows = tuple[Tensor, RowPairing, "float | Tensor"]


def write_scaled(target: Tensor, source: Tensor, scale: Tensor | None) -> None:
    """target ← source (· scale): one pass, in the target's dtype."""
    if scale is None:
        target.copy_(source)
    elif target.dtype == torch.promote_types(source.dtype, scale.dtype):
        torch.mul(source, scale, out=target)
    else:  # e.g. float32 factors writing into a bfloat16 gradient
        target.copy_(source).mul_(scale)


def concat(rows: list[Tensor]) -> Tensor:
    """The rows of every call stacked (rows are the second-to-last dim); no copy for the usual single call."""
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=-2)


class KFACLayer(ABC):
    """One preconditioned module: factors A (inputs) and B (output gradients), and G as an out × in' matrix.

    A subclass handles one module type: it says how inputs and output gradients become
    rows, and when a module of its type must keep the plain gradient.
    ``augment`` appends a column of ones to the inputs, so weight and bias share one
    Kronecker block (Martens & Grosse 2015, kfac-pytorch); otherwise a bias gets its own
    block B⁻¹ g_b (asdl's convention).
    """

    #: The module type this class handles (subclasses included).
    module_type: type[nn.Module] = nn.Module
    #: Whether positions are reduced before they become rows (K-FAC-reduce); expand otherwise.
    reduce: bool = False
    #: Leading block dims of the gradient matrix: () for one block, (groups,) for a grouped conv.
    blocks: tuple[int, ...] = ()
    #: Which side of the gradient matrix the weight's dim 0 is, for FSDP2's row shards: "out" (B's side: the weight
    #: is (out, in…) and :meth:`as_matrix` its view), "in" (A's side: the matrix is the weight transposed), or
    #: None where a shard is no block of the matrix (a slice of a shared weight, a tie).
    shard_side: str | None = "out"

    def __init__(self, name: str, module: nn.Module, in_dim: int, out_dim: int, has_bias: bool, augment: bool) -> None:
        if not self.handles(module):
            raise TypeError(f"{type(self).__name__} handles {self.module_type.__name__}, got {type(module).__name__}")
        self.name, self.module = name, module
        self.in_dim, self.out_dim = in_dim, out_dim
        self.has_bias, self.augment = has_bias, augment
        self.a_factor: KroneckerFactor | None = None
        self.b_factor: KroneckerFactor | None = None

    @classmethod
    def handles(cls, module: nn.Module) -> bool:
        """Whether ``module`` is of the type this class handles (override to match a type without importing it)."""
        return isinstance(module, cls.module_type)

    @classmethod
    def from_options(cls, name: str, module: nn.Module, options: KFACOptions) -> KFACLayer:
        """The layer for ``module`` under ``options``."""
        return cls(name, module, bias_mode=options.bias_mode)

    @classmethod
    def unsupported(cls, module: nn.Module, options: KFACOptions) -> str | None:
        """Why ``module`` must keep the plain gradient under ``options``; None when it can be handled."""
        return None

    @staticmethod
    def bias_flags(module: nn.Module, bias_mode: str) -> tuple[bool, bool]:
        """(has a trainable bias, the bias is a ones column of A)."""
        has_bias = getattr(module, "bias", None) is not None and module.bias.requires_grad
        return has_bias, has_bias and bias_mode == "augment"

    def attach(self) -> None:  # noqa: B027 (an optional hook: most layers need nothing)
        """Prepare the module for capture (most layers need nothing: plain forward hooks do)."""

    def detach(self) -> None:  # noqa: B027
        """Undo :meth:`attach`."""

    def describe(self) -> str:
        """The module type and weight-sharing treatment, for the coverage table."""
        return f"{self.module_type.__name__} ({'reduce' if self.reduce else 'expand'})"

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    def parameters(self) -> list[Tensor]:
        """The parameters this layer preconditions: the weight, and the bias when it has a trainable one (for a block
        of a shared weight, the whole shared tensors)."""
        return [self.weight] + ([self.module.bias] if self.has_bias else [])

    # -- factors --------------------------------------------------------------------
    def build_factors(
        self,
        rank: int,
        oversampling: int,
        dense_threshold: int,
        isotropic_tail: bool,
        generator: torch.Generator,
        dtype: torch.dtype,
    ) -> None:
        """Create A and B on the weight's device: dense when rank ≥ d or d ≤ dense_threshold.

        Otherwise A ≈ rank_k(A) (plus an isotropic tail if asked) and B ≈ rank_k(B − diag B) + diag B.
        A layer of several blocks (a grouped convolution) keeps every block exact, batched.
        """
        device = self.weight.device
        if self.blocks:
            self.a_factor = DenseFactor(self.in_dim, device, dtype, groups=self.blocks[0])
            self.b_factor = DenseFactor(self.out_dim, device, dtype, groups=self.blocks[0])
            return

        def dense(dim: int) -> bool:
            return rank >= dim or dim <= dense_threshold

        self.a_factor = self._special_input_factor(dtype)
        if self.a_factor is None:
            self.a_factor = (
                DenseFactor(self.in_dim, device, dtype)
                if dense(self.in_dim)
                else LowRankFactor(self.in_dim, rank, oversampling, generator, device, dtype, isotropic_tail)
            )
        self.b_factor = (
            DenseFactor(self.out_dim, device, dtype)
            if dense(self.out_dim)
            else DiagPlusLowRankFactor(self.out_dim, rank, oversampling, generator, device, dtype)
        )

    def _special_input_factor(self, dtype: torch.dtype) -> KroneckerFactor | None:
        """A factor of a known structure for A (e.g. diagonal), or None for the generic dense / low-rank one."""
        return None

    @property
    def factors(self) -> tuple[KroneckerFactor, KroneckerFactor]:
        assert self.a_factor is not None and self.b_factor is not None, "build_factors() first"
        return self.a_factor, self.b_factor

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the curvature state (gradients are preconditioned in it)."""
        return self.factors[0].dtype

    @property
    def ready(self) -> bool:
        """Both factors are refreshed (their owner prepares the inverses right after): the layer can be preconditioned."""
        return self.a_factor is not None and self.a_factor.refreshed and self.b_factor.refreshed

    def prepare_inverses(self, damping: float, split: DampingSplit = pi_damping) -> None:
        """Split λ between the factors at their current traces (π-damping by default, or relative to each factor:
        :data:`.preconditioner.DAMPING_SPLITS`) and prepare both factors' damped inverses."""
        a_factor, b_factor = self.factors
        damping_a, damping_b = split(damping, a_factor.trace, a_factor.dim, b_factor.trace, b_factor.dim)
        a_factor.prepare_inverse(damping_a)
        b_factor.prepare_inverse(damping_b)

    def work_cost(self) -> float:
        """Rough flops of one refresh plus one preconditioning of this layer (to balance ranks)."""
        (a_refresh, a_width), (b_refresh, b_width) = (factor.work() for factor in self.factors)
        return a_refresh + b_refresh + float(self.out_dim * self.in_dim) * (a_width + b_width)

    # -- statistics ---------------------------------------------------------------------
    def hooked_modules(self) -> dict[str, nn.Module]:
        """The modules (by name) whose inputs and output gradients this layer's statistics come from."""
        return {self.name: self.module}

    def record(
        self,
        pop: Callable[[nn.Module], tuple[list[Tensor], list[Tensor]]],
        per_example_grad: Callable[[float], float | Tensor],
        bases: Bases | None = None,
    ) -> PairedRows | None:
        """Take what the capture recorded for this layer's modules (``pop``) and :meth:`accumulate` it."""
        inputs, grads = pop(self.module)
        if inputs and grads:
            return self.accumulate(inputs, grads, per_example_grad, bases)
        return None

    def accumulate(
        self,
        inputs: list[Tensor],
        grads: list[Tensor],
        per_example_grad: Callable[[float], float | Tensor],
        bases: Bases | None = None,
    ) -> PairedRows | None:
        """Add one backward's statistics (every call of the module) to the pending sums of A and B.

        ``per_example_grad(examples)`` is the multiplier that turns a recorded output gradient
        of a loss averaged over ``examples`` into one example's own gradient. With ``bases`` (a
        rule's kept bases, EKFAC) it returns the B-rows, their weight and their pairing with the A-rows.
        """
        pairing = self._accumulate_inputs(inputs, bases)
        samples = sum(self.num_samples(g) for g in grads)
        multiplier = per_example_grad(samples / len(grads))
        on_device = isinstance(multiplier, Tensor)  # e.g. the AMP loss scale: the rows are multiplied by it
        weight = 1.0 / samples if on_device else multiplier * multiplier / samples  # (m·R)ᵀ(m·R) = m²·RᵀR
        if pairing is None and not on_device:
            self._accumulate_output_grads(grads, weight)
            return None
        b_rows = concat([self.output_grad_rows(g) for g in grads]).to(self.b_factor.dtype)
        if on_device:
            b_rows = b_rows * multiplier
        self.b_factor.accumulate(b_rows, weight)
        return None if pairing is None else (b_rows, pairing, weight)

    def _accumulate_output_grads(self, grads: list[Tensor], weight: float) -> None:
        """Add weight · rowsᵀrows of the output gradients (every call of the module: one estimate) to B."""
        self.b_factor.accumulate(concat([self.output_grad_rows(g) for g in grads]), weight)

    def _accumulate_inputs(self, inputs: list[Tensor], bases: Bases | None = None) -> RowPairing | None:
        """Add the inputs to A; with ``bases``, also return how to pair B-rows with the A-rows in U's coordinates."""
        # The bias's ones column stays implicit: the factor adds its blocks without a copy of the rows.
        a_rows = concat([self._input_rows(x) for x in inputs])
        self.a_factor.accumulate(a_rows, 1.0 / a_rows.shape[-2], ones_column=self.augment)
        if bases is None:
            return None
        squares = project_rows(a_rows.to(self.a_factor.dtype), bases.right, self.augment).square()
        return lambda left: left @ squares

    def input_rows(self, inputs: Tensor) -> Tensor:
        """Layer inputs as rows (samples × in'), with the ones column when the bias is augmented."""
        rows = self._input_rows(inputs)
        if self.augment:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
        return rows

    @abstractmethod
    def _input_rows(self, inputs: Tensor) -> Tensor:
        """Layer inputs as rows (samples × in), before any bias column."""

    @abstractmethod
    def output_grad_rows(self, grads: Tensor) -> Tensor:
        """Gradients w.r.t. the layer output as rows (samples × out)."""

    def batched(self, inputs: Tensor) -> bool:
        """Whether a call's first dimension indexes its examples (in its input and output gradient alike)."""
        return inputs.dim() >= 2

    @abstractmethod
    def num_samples(self, grads: Tensor) -> int:
        """Examples a mean-reduced loss averages over, for an output gradient of this shape."""

    # -- gradients ----------------------------------------------------------------------
    def as_matrix(self, weight_like: Tensor) -> Tensor:
        """A tensor shaped like the weight (its gradient) as (blocks…, out, in), a view: read and written through it."""
        return weight_like.view(*self.blocks, self.out_dim, -1)

    def weight_grad(self) -> Tensor | None:
        """This layer's part of the weight gradient (the whole ``.grad`` unless the weight is shared out in parts)."""
        return self.weight.grad

    def bias_grad(self) -> Tensor | None:
        return self.module.bias.grad

    def grad_matrix(self) -> Tensor | None:
        """∂L/∂W as (blocks…, out, in') (bias column appended when augmented; a view when it can be); None if no grad."""
        weight_grad = self.weight_grad()
        if weight_grad is None:
            return None
        matrix = self.as_matrix(weight_grad)
        if self.augment:
            bias_grad = self.bias_grad()
            if bias_grad is None:
                bias_grad = torch.zeros(weight_grad.shape[0], device=matrix.device, dtype=matrix.dtype)
            matrix = torch.cat([matrix, bias_grad.reshape(*self.blocks, self.out_dim, 1)], dim=-1)
        return matrix

    def separate_bias_grad(self) -> Tensor | None:
        """The bias gradient as (blocks…, out, 1) when it has its own block, else None."""
        if not self.has_bias or self.augment or self.bias_grad() is None:
            return None
        return self.bias_grad().reshape(*self.blocks, self.out_dim, 1)

    def write_grads(self, matrix: Tensor, bias_column: Tensor | None, scale: Tensor | None = None) -> None:
        """Write a preconditioned gradient matrix (and separate bias column), times ``scale`` if given, into .grad.

        One pass per tensor: the KL clip's scale is applied while writing, not as a pass of its own.
        """
        columns = self.in_dim - int(self.augment)
        write_scaled(self.as_matrix(self.weight_grad()), matrix[..., :columns], scale)
        if self.augment and self.bias_grad() is not None:
            write_scaled(self.bias_grad().view(*self.blocks, self.out_dim), matrix[..., -1], scale)
        elif bias_column is not None:
            write_scaled(self.bias_grad().view(*self.blocks, self.out_dim), bias_column[..., 0], scale)

    def split_inner_product(self, naturals: list[Tensor], grads: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """(⟨P, G⟩ over the weight, ⟨P, G⟩ over the bias or None): the KL clip weighs each by its own lr."""
        products = [natural * grad for natural, grad in zip(naturals, grads)]
        if self.augment:
            return products[0][..., :-1].sum(), products[0][..., -1].sum()
        return products[0].sum(), (products[1].sum() if len(products) > 1 else None)
