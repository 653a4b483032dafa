"""Per-layer K-FAC bookkeeping: how a Linear or Conv2d turns inputs, output gradients and
parameter gradients into the matrices that the factors and the preconditioner use."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lowrank import DenseFactor, DiagonalFactor, DiagPlusLowRankFactor, KroneckerFactor, LowRankFactor
from .preconditioner import pi_damping

BIAS_MODES = ("augment", "separate")
WEIGHT_SHARING = ("expand", "reduce")


def concat(rows: list[Tensor]) -> Tensor:
    """The rows of every call stacked; no copy for the usual single call."""
    return rows[0] if len(rows) == 1 else torch.cat(rows)


class KFACLayer:
    """One preconditioned module: its two factors and its gradient as an out × in' matrix.

    ``bias_mode="augment"`` appends a column of ones to the inputs, so weight and bias share
    one Kronecker block (Martens & Grosse 2015, kfac-pytorch). ``"separate"`` gives the bias
    its own block B⁻¹ g_b, the convention of asdl.

    A Linear applied to inputs (batch, shared…, features) shares its weight over the
    middle dimensions (sequence positions…). ``weight_sharing="expand"`` treats every position
    as an example; ``"reduce"`` first averages the inputs and sums the output gradients over
    the shared dimensions, one row per example (K-FAC-expand / -reduce, Eschenhagen et al.
    2023). The batch must be the first dimension. Conv2d always expands over locations.
    """

    def __init__(self, name: str, module: nn.Module, bias_mode: str, weight_sharing: str = "expand") -> None:
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"KFACLayer handles nn.Linear and nn.Conv2d, got {type(module).__name__}")
        has_bias = module.bias is not None and module.bias.requires_grad
        augment = has_bias and bias_mode == "augment"
        self._bind(name, module, module.weight[0].numel() + int(augment), module.weight.shape[0], has_bias, augment)
        self.reduce = weight_sharing == "reduce" and isinstance(module, nn.Linear)

    def _bind(self, name: str, module: nn.Module, in_dim: int, out_dim: int, has_bias: bool, augment: bool) -> None:
        """Set the attributes every layer kind has; the factors come later (build_factors)."""
        self.name, self.module = name, module
        self.in_dim, self.out_dim = in_dim, out_dim
        self.has_bias, self.augment, self.reduce = has_bias, augment, False
        self.a_factor: KroneckerFactor | None = None
        self.b_factor: KroneckerFactor | None = None

    @property
    def weight(self) -> Tensor:
        return self.module.weight

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
        """Create A (inputs) and B (output gradients): dense when rank ≥ d or d ≤ dense_threshold."""
        self.a_factor = self._input_factor(rank, oversampling, dense_threshold, isotropic_tail, generator, dtype=dtype)
        self.b_factor = self._output_factor(rank, oversampling, dense_threshold, generator, dtype)

    def _input_factor(
        self,
        rank: int,
        oversampling: int,
        dense_threshold: int,
        isotropic_tail: bool,
        generator: torch.Generator,
        dtype: torch.dtype,
    ) -> KroneckerFactor:
        """A: dense when rank ≥ in or in ≤ dense_threshold, else rank_k(A) (plus an isotropic tail if asked)."""
        device, dim = self.weight.device, self.in_dim
        if rank >= dim or dim <= dense_threshold:
            return DenseFactor(dim, device, dtype)
        return LowRankFactor(dim, rank, oversampling, generator, device, dtype, isotropic_tail)

    def _output_factor(
        self, rank: int, oversampling: int, dense_threshold: int, generator: torch.Generator, dtype: torch.dtype
    ) -> KroneckerFactor:
        """B: dense when rank ≥ out or out ≤ dense_threshold, else rank_k(B − diag B) + diag B."""
        device, dim = self.weight.device, self.out_dim
        if rank >= dim or dim <= dense_threshold:
            return DenseFactor(dim, device, dtype)
        return DiagPlusLowRankFactor(dim, rank, oversampling, generator, device, dtype)

    @property
    def factors(self) -> tuple[KroneckerFactor, KroneckerFactor]:
        assert self.a_factor is not None and self.b_factor is not None, "build_factors() first"
        return self.a_factor, self.b_factor

    @property
    def ready(self) -> bool:
        """Both factors are refreshed (their owner prepares the inverses right after): the layer can be preconditioned."""
        return self.a_factor is not None and self.a_factor.refreshed and self.b_factor.refreshed

    def prepare_inverses(self, damping: float) -> None:
        """Split λ by π-damping at the current traces and prepare both factors' damped inverses."""
        a_factor, b_factor = self.factors
        damping_a, damping_b = pi_damping(damping, a_factor.trace, a_factor.dim, b_factor.trace, b_factor.dim)
        a_factor.prepare_inverse(damping_a)
        b_factor.prepare_inverse(damping_b)

    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        """[(B + δ_B)⁻¹ G (A + δ_A)⁻¹] and, for a separate bias block, [(B + δ_B)⁻¹ g_b].

        Contiguous, like the buffers other ranks receive them in: a sum over them then runs
        in the same order on every rank (the KL clip), so the ranks stay bitwise identical.
        """
        a_factor, b_factor = self.factors
        naturals = [b_factor.inverse_left(a_factor.inverse_right(grads[0]))]
        if len(grads) > 1:
            naturals.append(b_factor.inverse_left(grads[1]))
        return [natural.contiguous() for natural in naturals]

    def work_cost(self) -> float:
        """Rough flops of one refresh plus one preconditioning of this layer (to balance ranks)."""
        (a_refresh, a_width), (b_refresh, b_width) = (factor.work() for factor in self.factors)
        return a_refresh + b_refresh + float(self.out_dim * self.in_dim) * (a_width + b_width)

    # -- statistics ---------------------------------------------------------------------
    def accumulate(
        self, inputs: list[Tensor], grads: list[Tensor], per_example_grad: Callable[[float], float | Tensor]
    ) -> None:
        """Add one backward's statistics (every call of the module) to the pending sums of A and B.

        ``per_example_grad(examples)`` is the multiplier that turns a recorded output gradient
        of a loss averaged over ``examples`` into one example's own gradient.
        """
        self._accumulate_inputs(inputs)
        samples = sum(self.num_samples(g) for g in grads)
        b_rows = concat([self.output_grad_rows(g) for g in grads]).to(self.b_factor.dtype)
        multiplier = per_example_grad(samples / len(grads))
        if isinstance(multiplier, Tensor):  # e.g. the AMP loss scale, kept on the device
            self.b_factor.accumulate(b_rows * multiplier, 1.0 / samples)
        else:  # (m·rows)ᵀ(m·rows) = m²·rowsᵀrows: no n×d multiply
            self.b_factor.accumulate(b_rows, multiplier * multiplier / samples)

    def _accumulate_inputs(self, inputs: list[Tensor]) -> None:
        a_rows = concat([self.input_rows(x) for x in inputs])
        self.a_factor.accumulate(a_rows, 1.0 / a_rows.shape[0])

    def input_rows(self, inputs: Tensor) -> Tensor:
        """Layer inputs as rows (samples × in'): Conv2d via im2col, one row per output location."""
        module = self.module
        if isinstance(module, nn.Conv2d):
            padding = module.padding
            if isinstance(padding, str) or module.padding_mode != "zeros":
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
                padding = 0
            patches = F.unfold(
                inputs, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
            )
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            if self.reduce and inputs.dim() > 2:
                inputs = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).mean(1)
            rows = inputs.reshape(-1, inputs.shape[-1])
        if self.augment:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def output_grad_rows(self, grads: Tensor) -> Tensor:
        """Gradients w.r.t. the layer output as rows (locations × out)."""
        if isinstance(self.module, nn.Conv2d):
            return grads.movedim(1, -1).reshape(-1, grads.shape[1])
        if self.reduce and grads.dim() > 2:
            grads = grads.reshape(grads.shape[0], -1, grads.shape[-1]).sum(1)
        return grads.reshape(-1, grads.shape[-1])

    def num_samples(self, grads: Tensor) -> int:
        """Examples a mean-reduced loss averages over: the batch for Conv2d and reduced Linear,
        every position for an expanded Linear."""
        if isinstance(self.module, nn.Conv2d) or (self.reduce and grads.dim() > 2):
            return grads.shape[0]
        return grads.numel() // grads.shape[-1]

    # -- gradients ----------------------------------------------------------------------
    def grad_matrix(self) -> Tensor | None:
        """∂L/∂W as an out × in' matrix (bias column appended when augmented); None if no grad."""
        weight_grad = self.weight.grad
        if weight_grad is None:
            return None
        matrix = weight_grad.reshape(self.out_dim, -1)
        if self.augment:
            bias_grad = self.module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros(self.out_dim, device=matrix.device, dtype=matrix.dtype)
            matrix = torch.cat([matrix, bias_grad[:, None]], dim=1)
        return matrix

    def separate_bias_grad(self) -> Tensor | None:
        """The bias gradient as an out × 1 matrix when it has its own block, else None."""
        if not self.has_bias or self.augment or self.module.bias.grad is None:
            return None
        return self.module.bias.grad[:, None]

    def write_grads(self, matrix: Tensor, bias_column: Tensor | None) -> None:
        """Copy a preconditioned gradient matrix (and separate bias column) back into .grad."""
        weight_part = matrix[:, : self.in_dim - int(self.augment)]
        self.weight.grad.copy_(weight_part.reshape_as(self.weight.grad))
        if self.augment and self.module.bias.grad is not None:
            self.module.bias.grad.copy_(matrix[:, -1])
        elif bias_column is not None:
            self.module.bias.grad.copy_(bias_column[:, 0])


class EmbeddingLayer(KFACLayer):
    """``nn.Embedding`` as a Linear on one-hot inputs, y = Wᵀx (out = embedding_dim, in = num_embeddings).

    Every position is an example (expand). A = E[x xᵀ] is then exactly diagonal: the token
    frequencies, kept as a :class:`~.lowrank.DiagonalFactor` in O(num_embeddings). B is the
    usual output-gradient factor over the embedding dimension. The natural gradient of the
    (num_embeddings × dim) weight is A⁻¹ G B⁻¹: each token's row is scaled by its inverse
    frequency and turned by B⁻¹. ``padding_idx`` positions count as zero inputs.
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"EmbeddingLayer handles nn.Embedding, got {type(module).__name__}")
        self._bind(name, module, module.num_embeddings, module.embedding_dim, has_bias=False, augment=False)

    def _input_factor(self, *_: object, dtype: torch.dtype) -> KroneckerFactor:
        """A: the exact diagonal of token frequencies, whatever the rank."""
        return DiagonalFactor(self.in_dim, self.weight.device, dtype)

    def _accumulate_inputs(self, inputs: list[Tensor]) -> None:
        """A: per-token counts over all positions (scatter-add: no host sync), divided by the positions."""
        tokens = torch.cat([x.reshape(-1) for x in inputs])
        ones = torch.ones(tokens.shape, device=tokens.device, dtype=self.a_factor.dtype)
        if self.module.padding_idx is not None:
            ones = ones * (tokens != self.module.padding_idx)
        counts = torch.zeros(self.in_dim, device=tokens.device, dtype=self.a_factor.dtype).index_add_(0, tokens, ones)
        self.a_factor.accumulate_diagonal(counts, 1.0 / tokens.numel())

    def grad_matrix(self) -> Tensor | None:
        """∂L/∂Wᵀ as an embedding_dim × num_embeddings matrix; None if no grad."""
        weight_grad = self.weight.grad
        return None if weight_grad is None else weight_grad.mT

    def write_grads(self, matrix: Tensor, bias_column: Tensor | None) -> None:
        self.weight.grad.copy_(matrix.mT)
