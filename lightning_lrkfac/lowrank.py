"""Streaming Kronecker factors: a running average kept dense (exact mode) or as a sketch.

Every factor follows the same cycle. ``accumulate`` adds one micro-batch's statistics to
a pending sum; ``fold`` turns the pending mean into one step of the exponential moving
average (EMA); ``refresh`` recomputes the eigen-approximation used to precondition.

The low-rank factors never hold a d×d matrix. They keep a test matrix V (d×m, m = rank
+ oversampling, orthonormal) and the sketch Y = F·V of the running average F. The
sketch is linear in F, so micro-batches, EMA steps and data-parallel ranks combine by
plain sums of O(m·d) numbers. A refresh is one step of warm-started block subspace
iteration: a single-pass Nyström approximation from (V, Y) gives eigenpairs in
span(F·V); they become the next test matrix, and the Nyström approximation of F is
carried over as the memory of the running average.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import nystrom_eigh, random_orthonormal, symmetric_eigh_desc
from .preconditioner import DiagPlusLowRankInverse, apply_eigen_inverse_right, eigen_inverse_coefficients

#: On a CPU, statistics are computed over pieces of about this many numbers of the rows, so that their
#: temporaries (R V, R², a copy into rows) stay in cache: 2-3× faster than whole at 10⁷ numbers. Elsewhere whole.
CPU_CHUNK_ELEMENTS = 1 << 19


def row_chunks(rows: Tensor, dim: int = -2) -> tuple[Tensor, ...]:
    """``rows`` split along ``dim`` into views of about :data:`CPU_CHUNK_ELEMENTS` numbers on a CPU; whole elsewhere."""
    if rows.device.type != "cpu" or rows.numel() <= CPU_CHUNK_ELEMENTS:
        return (rows,)
    per_slice = rows.numel() // max(1, rows.shape[dim])
    return rows.split(max(1, CPU_CHUNK_ELEMENTS // max(1, per_slice)), dim=dim)


def add_scaled(target: Tensor, value: Tensor, weight: float | Tensor) -> None:
    """target += weight · value in one kernel when the weight is a number."""
    if isinstance(weight, Tensor):
        target.add_(weight * value)
    else:
        target.add_(value, alpha=weight)


def add_product(target: Tensor, left: Tensor, right: Tensor, weight: float | Tensor) -> None:
    """target += weight · left @ right (batched over a leading dim for 3-D operands), fused when the weight is a number."""
    if isinstance(weight, Tensor):
        target.add_(weight * (left @ right))
    elif left.dim() == 3:
        target.baddbmm_(left, right, alpha=weight)
    else:
        target.addmm_(left, right, alpha=weight)


def all_finite(tensors: list[Tensor]) -> Tensor:
    """True (a bool tensor, no host sync) when no entry of any tensor is inf or NaN.

    One reduction per tensor: a sum is finite exactly when its entries are (short of an
    overflow of the sum itself, which would leave the state unusable anyway).
    """
    return torch.stack([t.sum() for t in tensors]).isfinite().all()


def fold_groups(
    groups: list[list[KroneckerFactor]], decay: float, valid: Tensor | None = None, scale: float = 1
) -> Tensor:
    """EMA-fold the pending statistics of groups of factors (each layer's A and B) at once; a group only where
    all of its next state is finite (and ``valid``, a bool tensor: no host sync). Returns the groups that took it.

    F ← ρF + (1−ρ)·pending/(count·``scale``), ``scale`` the data-parallel world size whose sum the
    pending buffers hold; the first fold takes the mean as is. The blend runs in the pending
    buffers as two fused (foreach) kernels, the check as one; the buffers are then cleared.
    """
    factors = [factor for group in groups for factor in group]
    pendings = [factor.pending_tensors() for factor in factors]
    states = [factor.state_tensors() for factor in factors]
    flat = [tensor for tensors in pendings for tensor in tensors]
    keep = [decay if factor.initialized else 0.0 for factor in factors]
    torch._foreach_mul_(
        flat,
        [(1.0 - rho) / (factor.pending_count * scale) for factor, rho, ts in zip(factors, keep, pendings) for _ in ts],
    )
    carried = [(p, s) for rho, ps, ss in zip(keep, pendings, states) if rho for p, s in zip(ps, ss)]
    if carried:
        torch._foreach_add_([p for p, _ in carried], [s for _, s in carried], alpha=decay)
    # Σ|x| of every tensor (inf or NaN for non-finite entries), one row per group, padded with zeros
    peaks = iter(torch._foreach_norm(flat, ord=1))
    counts = [len(tensors) for tensors in pendings]
    sizes = [sum(counts[start : start + len(group)]) for group, start in zip(groups, _starts(groups))]
    padding = flat[0].new_zeros(())
    rows = [next(peaks) if column < size else padding for size in sizes for column in range(max(sizes))]
    taken = torch.stack(rows).view(len(groups), max(sizes)).sum(1).isfinite()
    if valid is not None:
        taken = taken & valid
    for group, start, group_taken in zip(groups, _starts(groups), taken):
        for factor, tensors, new_tensors in zip(group, states[start:], pendings[start:]):
            for state, new in zip(tensors, new_tensors):
                torch.where(group_taken, new, state, out=state)
            factor.pending_count = 0
            factor.initialized = True
    torch._foreach_zero_(flat)
    return taken


def _starts(groups: list[list[KroneckerFactor]]) -> list[int]:
    """Index of each group's first factor in the flattened list."""
    return list(itertools.accumulate([0, *(len(group) for group in groups)]))[:-1]


def check_tensors(current: dict[str, Tensor], saved: object, key: str) -> None:
    """Raise ``ValueError`` naming the first entry of ``saved`` that is missing, extra, or of another shape or dtype."""
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint entry `{key}` must be a dict of tensors, got {type(saved).__name__}")
    for name in sorted(set(current) | set(saved)):
        where = f"`{key}.{name}`"
        if name not in saved:
            raise ValueError(f"checkpoint entry {where} is missing")
        value = saved[name]
        if name not in current or not isinstance(value, Tensor):
            raise ValueError(f"checkpoint entry {where} is not a tensor of this state")
        if value.shape != current[name].shape or value.dtype != current[name].dtype:
            raise ValueError(
                f"checkpoint entry {where} is {value.dtype} {tuple(value.shape)}, expected {current[name].dtype} {tuple(current[name].shape)}"
            )


@dataclass
class InverseForm:
    """The prepared damped inverse as (F̃ + δI)⁻¹ X = s·X + e∘X + W M (Wᵀ X), for callers that apply it in pieces
    (in place, or on a row shard): ``diag`` e and ``basis`` W may be None, ``middle`` M is a matrix or a vector
    (diagonal). Eigenpairs: s the tail's scale, e None, W = U, M = c; diagonal plus low rank (Woodbury): s = 0,
    e = E⁻¹, W = E⁻¹V, M = −K; a diagonal: e only."""

    scale: float
    diag: Tensor | None
    basis: Tensor | None
    middle: Tensor | None

    @property
    def thin(self) -> bool:
        """A one-block form whose basis keeps fewer directions than the dimension (a low-rank correction)."""
        return self.basis is not None and self.basis.dim() == 2 and self.basis.shape[1] < self.basis.shape[0]


class KroneckerFactor(ABC):
    """One EMA Kronecker factor (A or B) of one layer."""

    #: Isotropic level σ of the dropped spectrum, σ(I − UUᵀ); None where nothing is dropped.
    tail: Tensor | None = None
    #: Eigenvalues the SPD guard raised so far (a 0-dim count); None for factors that are SPD by construction.
    repairs: Tensor | None = None

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self.trace = torch.zeros((), device=device, dtype=dtype)
        self.pending_trace = torch.zeros((), device=device, dtype=dtype)
        self.pending_count = 0
        self.initialized = False
        self.refreshed = False
        #: Damping δ of the prepared inverse (F̃ + δI)⁻¹, fixed between refreshes.
        self.inverse_damping = torch.zeros((), device=device, dtype=dtype)

    # -- statistics -----------------------------------------------------------------
    #: Whether :meth:`_accumulate` takes ``ones_column`` itself (else the column is materialised).
    implicit_ones_column = False

    def accumulate(
        self, rows: Tensor, weight: float | Tensor, ones_column: bool = False, new_estimate: bool = True
    ) -> None:
        """Add weight · rowsᵀrows (one micro-batch's estimate of the factor) to the pending sum.

        ``ones_column``: the rows stand for [rows, 1] (an augmented bias), without a copy of them.
        ``new_estimate`` False: the rows add to the estimate the previous call began (a tied weight's other use).
        """
        for piece in row_chunks(rows):  # sums over rows: the same in pieces
            piece = piece.to(self.dtype)
            if not ones_column:
                self._accumulate(piece, weight)
            elif self.implicit_ones_column:
                self._accumulate(piece, weight, ones_column=True)
            else:
                self._accumulate(torch.cat([piece, piece.new_ones(*piece.shape[:-1], 1)], dim=-1), weight)
        self.pending_count += int(new_estimate)

    def accumulate_diagonal(self, diagonal: Tensor, weight: float | Tensor, new_estimate: bool = True) -> None:
        """Add weight · diag(``diagonal``), a micro-batch's estimate known to be diagonal (one-hot rows), to the pending sum."""
        self._add_diagonal(diagonal.to(self.dtype), weight)
        self.pending_count += int(new_estimate)

    def _add_diagonal(self, diagonal: Tensor, weight: float | Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} takes no diagonal-only statistics")

    def pending_tensors(self) -> list[Tensor]:
        """Tensors summed over micro-batches, in a fixed order (for all-reduce and checks)."""
        return [self.pending_trace, *self._pending()]

    def fold(self, decay: float, valid: Tensor, count: int | None = None) -> None:
        """F ← ρF + (1−ρ)·mean(pending) where ``valid`` and the result is finite, else F unchanged.

        ``count`` is the number of micro-batch estimates the pending sums hold (after a
        data-parallel sum it is the global count). The first fold takes the mean as is.
        """
        if (self.pending_count if count is None else count) == 0:
            return
        fold_groups([[self]], decay, valid, 1 if count is None else count / self.pending_count)

    def state_tensors(self) -> list[Tensor]:
        """EMA state, paired one to one with :meth:`pending_tensors`."""
        return [self.trace, *self._state()]

    @abstractmethod
    def _accumulate(self, rows: Tensor, weight: float | Tensor) -> None: ...

    @abstractmethod
    def _pending(self) -> list[Tensor]: ...

    @abstractmethod
    def _state(self) -> list[Tensor]: ...

    @abstractmethod
    def refresh(self) -> None:
        """Recompute the eigen-approximation from the current running average."""

    @abstractmethod
    def captured_trace(self) -> Tensor:
        """Share of tr F that the kept eigenpairs represent (1 in exact mode)."""

    @abstractmethod
    def basis_tensors(self) -> list[Tensor]:
        """What a refresh writes, in a fixed order and fixed shapes: copied in place on other ranks."""

    @abstractmethod
    def work(self) -> tuple[float, int]:
        """(flops of a refresh, width of the inverse apply): the cost model for spreading layers over ranks."""

    def prepare_inverse(self, damping: Tensor) -> None:
        """Fix δ and precompute what applying (F̃ + δI)⁻¹ needs; called after each refresh, not per step."""
        self.inverse_damping = damping.to(self.dtype)

    @abstractmethod
    def inverse_right(self, matrix: Tensor) -> Tensor:
        """X ↦ X (F̃ + δI)⁻¹ with F̃ the approximation and δ the damping of the last :meth:`prepare_inverse`."""

    @abstractmethod
    def inverse_left(self, matrix: Tensor) -> Tensor:
        """X ↦ (F̃ + δI)⁻¹ X."""

    def inverse_form(self) -> InverseForm | None:
        """The prepared inverse in pieces (see :class:`InverseForm`); None where it has no such form."""
        return None

    @abstractmethod
    def describe(self) -> str:
        """How the factor is kept, for the coverage table: 'dense 64', 'rank 16/512', 'diagonal 1000'."""

    def discard_pending(self) -> None:
        """Drop the pending statistics (a step that is skipped leaves no trace)."""
        for pending in self.pending_tensors():
            pending.zero_()
        self.pending_count = 0

    # -- checkpointing ----------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        return {name: value for name, value in vars(self).items() if isinstance(value, Tensor)}

    def state_dict(self) -> dict[str, object]:
        return {
            "kind": type(self).__name__,
            "dim": self.dim,
            "initialized": self.initialized,
            "refreshed": self.refreshed,
            "tensors": {name: value.detach().clone() for name, value in self._tensors().items()},
        }

    def check_state(self, state: dict[str, object], key: str) -> None:
        """Raise ``ValueError`` naming the first entry of ``state`` that does not fit this factor (nothing is loaded)."""
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint entry `{key}` must be a dict, got {type(state).__name__}")
        for field in ("kind", "dim", "initialized", "refreshed", "tensors"):
            if field not in state:
                raise ValueError(f"checkpoint entry `{key}.{field}` is missing")
        if state["kind"] != type(self).__name__ or state["dim"] != self.dim:
            raise ValueError(
                f"checkpoint entry `{key}` holds a {state['kind']} of size {state['dim']}, this layer has a {type(self).__name__} of size {self.dim}"
            )
        check_tensors(self._tensors(), state["tensors"], f"{key}.tensors")

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Copy a state that :meth:`check_state` accepted into this factor's tensors."""
        for name, current in self._tensors().items():
            current.copy_(state["tensors"][name])
        self.initialized = bool(state["initialized"])
        self.refreshed = bool(state["refreshed"])


class EigenInverse:
    """(U diag(λ) Uᵀ [+ σ(I − UUᵀ)] + δI)⁻¹ of a factor kept as eigenpairs, prepared once per refresh.

    The prepared coefficients c and scale s (X ↦ s·X + (XU ∘ c)Uᵀ) are tensors, so checkpoints
    carry them; s is also kept as a number (read once per preparation: one host sync per
    refresh, none per step) so that one addmm writes the result.
    """

    eigenvectors: Tensor
    eigenvalues: Tensor
    inverse_damping: Tensor
    inverse_coefficients: Tensor
    inverse_tail_scale: Tensor
    tail: Tensor | None
    _tail_scale: float = 0.0

    def _prepare_eigen_inverse(self) -> None:
        complete = self.eigenvectors.shape[-1] == self.eigenvectors.shape[-2]
        coefficients, tail_scale = eigen_inverse_coefficients(
            self.eigenvalues, self.inverse_damping, self.tail, complete
        )
        self.inverse_coefficients.copy_(coefficients.reshape(self.inverse_coefficients.shape))
        self.inverse_tail_scale.copy_(tail_scale.reshape(self.inverse_tail_scale.shape))
        self._tail_scale = 0.0 if complete else float(tail_scale)

    @property
    def inverse_scale(self) -> float:
        """s of the prepared inverse s·X + (XU ∘ c)Uᵀ: the scale of the part outside the kept eigenvectors."""
        return self._tail_scale

    def inverse_right(self, matrix: Tensor) -> Tensor:
        return apply_eigen_inverse_right(matrix, self.eigenvectors, self.inverse_coefficients, self._tail_scale)

    def inverse_form(self) -> InverseForm:
        return InverseForm(self._tail_scale, None, self.eigenvectors, self.inverse_coefficients)

    def inverse_left(self, matrix: Tensor) -> Tensor:
        return self.inverse_right(matrix.mT).mT


class DenseFactor(EigenInverse, KroneckerFactor):
    """Exact mode: the d×d running average itself, eigendecomposed at each refresh.

    ``groups`` > 1 keeps that many independent blocks at once (a grouped convolution): rows
    come as (groups, n, d), every tensor carries the group as its leading dim (traces and
    damping too, so each block has its own π), and refresh and apply are batched.
    """

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype, groups: int = 1) -> None:
        super().__init__(dim, device, dtype)
        self.groups = groups
        lead = (groups,) if groups > 1 else ()
        self.trace = torch.zeros(lead, device=device, dtype=dtype)
        self.pending_trace = torch.zeros_like(self.trace)
        self.inverse_damping = torch.zeros_like(self.trace)
        self.matrix = torch.zeros(*lead, dim, dim, device=device, dtype=dtype)
        self.pending_matrix = torch.zeros_like(self.matrix)
        self.eigenvectors = torch.eye(dim, device=device, dtype=dtype).expand(*lead, dim, dim).contiguous()
        self.eigenvalues = torch.zeros(*lead, dim, device=device, dtype=dtype)
        # 1/(λ+δ) per block, shaped to broadcast over the rows of a (groups, rows, d) batch.
        self.inverse_coefficients = torch.zeros(*lead, *((1,) if groups > 1 else ()), dim, device=device, dtype=dtype)
        self.inverse_tail_scale = torch.zeros_like(self.trace)

    implicit_ones_column = True

    def _accumulate(self, rows: Tensor, weight: float | Tensor, ones_column: bool = False) -> None:
        # [R 1]ᵀ[R 1] = [[RᵀR, Rᵀ1], [1ᵀR, n]], written block by block
        add_product(self._body(ones_column), rows.mT, rows, weight)
        self._add_rest(rows.sum(-2) if ones_column else None, rows.shape[-2], weight)

    def accumulate_gram(self, gram: Tensor, column_sums: Tensor | None, count: int, weight: float | Tensor) -> None:
        """Add a micro-batch given as RᵀR (…, d, d) and, for a ones column, Rᵀ1 and the row count.

        For callers that form the product without a row matrix (a grouped convolution's patches).
        """
        add_scaled(self._body(column_sums is not None), gram.to(self.dtype), weight)
        self._add_rest(None if column_sums is None else column_sums.to(self.dtype), count, weight)
        self.pending_count += 1

    def _add_diagonal(self, diagonal: Tensor, weight: float | Tensor) -> None:
        add_scaled(self.pending_matrix.diagonal(dim1=-2, dim2=-1), diagonal, weight)
        self._add_rest(None, 0, weight)

    def _body(self, ones_column: bool) -> Tensor:
        return self.pending_matrix[..., :-1, :-1] if ones_column else self.pending_matrix

    def _add_rest(self, column_sums: Tensor | None, count: int, weight: float | Tensor) -> None:
        """The ones column's blocks (when given), then the pending trace."""
        if column_sums is not None:
            add_scaled(self.pending_matrix[..., :-1, -1], column_sums, weight)
            add_scaled(self.pending_matrix[..., -1, :-1], column_sums, weight)
            add_scaled(self.pending_matrix[..., -1, -1], torch.full_like(column_sums[..., 0], count), weight)
        # tr(rowsᵀrows) = Σ rows²: read off the diagonal instead of another pass over the rows.
        self.pending_trace.copy_(self.pending_matrix.diagonal(dim1=-2, dim2=-1).sum(-1))

    def _pending(self) -> list[Tensor]:
        return [self.pending_matrix]

    def _state(self) -> list[Tensor]:
        return [self.matrix]

    def refresh(self) -> None:
        values, vectors = symmetric_eigh_desc(self.matrix)
        self.eigenvalues, self.eigenvectors = values.clamp_min(0.0), vectors
        self.refreshed = True

    def prepare_inverse(self, damping: Tensor) -> None:
        super().prepare_inverse(damping)
        self._prepare_eigen_inverse()  # X_g ↦ X_g (F_g + δ_g I)⁻¹, batched over the groups

    def captured_trace(self) -> Tensor:
        return torch.ones((), device=self.device, dtype=self.dtype)

    def describe(self) -> str:
        return f"dense {self.groups}×{self.dim}" if self.groups > 1 else f"dense {self.dim}"

    def basis_tensors(self) -> list[Tensor]:
        return [self.eigenvectors, self.eigenvalues]

    def work(self) -> tuple[float, int]:
        return self.groups * float(self.dim) ** 3, self.dim


class DiagonalFactor(KroneckerFactor):
    """A factor kept as its diagonal, O(d): exact where the factor is diagonal by construction.

    An ``nn.Embedding`` is a Linear on one-hot inputs, so its A = E[x xᵀ] is the diagonal of
    token frequencies; :meth:`accumulate_diagonal` takes those counts without forming rows.
    """

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(dim, device, dtype)
        self.diag = torch.zeros(dim, device=device, dtype=dtype)
        self.pending_diag = torch.zeros_like(self.diag)
        #: 1 / (diag + δ) as prepared at the last refresh.
        self.inverse_diagonal = torch.zeros_like(self.diag)

    def _accumulate(self, rows: Tensor, weight: float | Tensor) -> None:
        self._add_diagonal(rows.square().sum(0), weight)

    def _add_diagonal(self, diagonal: Tensor, weight: float | Tensor) -> None:
        add_scaled(self.pending_diag, diagonal, weight)
        add_scaled(self.pending_trace, diagonal.sum(), weight)

    def _pending(self) -> list[Tensor]:
        return [self.pending_diag]

    def _state(self) -> list[Tensor]:
        return [self.diag]

    def refresh(self) -> None:
        self.refreshed = True

    def prepare_inverse(self, damping: Tensor) -> None:
        super().prepare_inverse(damping)
        self.inverse_diagonal = 1.0 / (self.diag.clamp_min(0.0) + self.inverse_damping)

    def inverse_right(self, matrix: Tensor) -> Tensor:
        return matrix * self.inverse_diagonal

    def inverse_left(self, matrix: Tensor) -> Tensor:
        return self.inverse_diagonal[:, None] * matrix

    def captured_trace(self) -> Tensor:
        return torch.ones((), device=self.device, dtype=self.dtype)

    def describe(self) -> str:
        return f"diagonal {self.dim}"

    def inverse_form(self) -> InverseForm:
        return InverseForm(0.0, self.inverse_diagonal, None, None)

    def basis_tensors(self) -> list[Tensor]:
        return []  # a refresh computes nothing: the folded diagonal is the same on every rank

    def work(self) -> tuple[float, int]:
        return float(self.dim), 1


class SketchedFactor(KroneckerFactor):
    """Shared sketch machinery of the two low-rank factors: V, Y = F·V and their pending sum."""

    implicit_ones_column = True

    def __init__(
        self,
        dim: int,
        rank: int,
        oversampling: int,
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(dim, device, dtype)
        self.rank = rank
        width = min(rank + oversampling, dim)
        self.test = random_orthonormal(dim, width, generator, device, dtype)
        self.sketch = torch.zeros(dim, width, device=device, dtype=dtype)
        self.pending_sketch = torch.zeros_like(self.sketch)
        self.eigenvectors = self.test[:, :rank]
        self.eigenvalues = torch.zeros(rank, device=device, dtype=dtype)

    def _accumulate(self, rows: Tensor, weight: float | Tensor, ones_column: bool = False) -> None:
        self._accumulate_sketch(rows, weight, ones_column)
        squares = rows.square().sum()
        add_scaled(self.pending_trace, squares + rows.shape[-2] if ones_column else squares, weight)

    def _accumulate_sketch(self, rows: Tensor, weight: float | Tensor, ones_column: bool = False) -> None:
        """pending F·V += weight · rowsᵀ(rows V); with ``ones_column``, [R 1]ᵀ([R 1] V) block by block."""
        if not ones_column:
            add_product(self.pending_sketch, rows.mT, rows @ self.test, weight)
            return
        projected = torch.addmm(self.test[-1], rows, self.test[:-1])  # [R 1] V = R V' + 1 vᵀ
        add_product(self.pending_sketch[:-1], rows.mT, projected, weight)
        add_scaled(self.pending_sketch[-1], projected.sum(0), weight)

    def accumulate_sketch(self, product: Tensor, squares: Tensor, weight: float | Tensor) -> None:
        """Add a micro-batch given as its products: ``product`` = rowsᵀ(rows V) (d × m), ``squares`` = Σ rows².

        For callers that compute them without materialising the rows (a convolution's patches).
        """
        add_scaled(self.pending_sketch, product.to(self.dtype), weight)
        add_scaled(self.pending_trace, squares.to(self.dtype), weight)
        self.pending_count += 1

    def _pending(self) -> list[Tensor]:
        return [self.pending_sketch]

    def _state(self) -> list[Tensor]:
        return [self.sketch]

    def describe(self) -> str:
        return f"rank {self.rank}/{self.dim}"

    def basis_tensors(self) -> list[Tensor]:
        """The eigenvectors are the first columns of ``test``, so they travel with it."""
        return [self.test, self.sketch, self.eigenvalues]

    def work(self) -> tuple[float, int]:
        return float(self.dim) * self.test.shape[1] ** 2, self.rank


class LowRankFactor(EigenInverse, SketchedFactor):
    """A ≈ U Λ Uᵀ (top-k eigenpairs), optionally + σ(I − UUᵀ) for the dropped tail of the trace."""

    def __init__(
        self,
        dim: int,
        rank: int,
        oversampling: int,
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
        isotropic_tail: bool = False,
    ) -> None:
        super().__init__(dim, rank, oversampling, generator, device, dtype)
        self.isotropic_tail = isotropic_tail
        self.tail = torch.zeros((), device=device, dtype=dtype)
        self.inverse_coefficients = torch.zeros(rank, device=device, dtype=dtype)
        self.inverse_tail_scale = torch.zeros((), device=device, dtype=dtype)

    def prepare_inverse(self, damping: Tensor) -> None:
        super().prepare_inverse(damping)
        self._prepare_eigen_inverse()

    def load_state_dict(self, state: dict[str, object]) -> None:
        super().load_state_dict(state)
        self._tail_scale = float(self.inverse_tail_scale)  # the prepared inverse, as saved

    def refresh(self) -> None:
        vectors, values = nystrom_eigh(self.test, self.sketch)
        self.eigenvectors, self.eigenvalues = vectors[:, : self.rank], values[: self.rank]  # views of the test matrix
        if self.isotropic_tail:
            remaining = (self.trace - self.eigenvalues.sum()).clamp_min(0.0)
            self.tail = remaining / (self.dim - self.rank)
        self.test, self.sketch = vectors, vectors * values
        self.refreshed = True

    def captured_trace(self) -> Tensor:
        return self.eigenvalues.sum() / self.trace.clamp_min(torch.finfo(self.dtype).tiny)

    def basis_tensors(self) -> list[Tensor]:
        return [*super().basis_tensors(), self.tail]


class DiagPlusLowRankFactor(SketchedFactor):
    """B ≈ rank_k(B − diag B) + diag B, the diagonal kept exactly.

    The iteration runs on the PSD matrix S = B − diag B + σI with σ = max diag B
    (B ⪰ 0 gives λ_min(B − diag B) ≥ −σ), so it converges to the algebraically largest
    eigenpairs of B − diag B, the ones that keep the damped approximation SPD; the
    k×k guard in :class:`~.preconditioner.DiagPlusLowRankInverse` catches the rest.
    """

    implicit_ones_column = False  # B: output gradients have no ones column

    def __init__(
        self,
        dim: int,
        rank: int,
        oversampling: int,
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(dim, rank, oversampling, generator, device, dtype)
        self.diag = torch.zeros(dim, device=device, dtype=dtype)
        self.pending_diag = torch.zeros_like(self.diag)
        self.repairs = torch.zeros((), device=device, dtype=torch.int64)
        # The prepared Woodbury operator (with the eigenvectors as its basis), kept as tensors
        # so that checkpoints carry it exactly.
        self.inverse_diag = torch.zeros(dim, device=device, dtype=dtype)
        self.inverse_core = torch.zeros(rank, rank, device=device, dtype=dtype)
        self.inverse_scaled_basis = torch.zeros(dim, rank, device=device, dtype=dtype)

    def prepare_inverse(self, damping: Tensor) -> None:
        """Build the SPD-guarded Woodbury operator at the current diag B, once per refresh; repairs are counted."""
        super().prepare_inverse(damping)
        inverse = DiagPlusLowRankInverse.build(self.diag, self.eigenvectors, self.eigenvalues, self.inverse_damping)
        self.inverse_diag, self.inverse_core = inverse.inverse_diag, inverse.core
        self.inverse_scaled_basis = inverse.scaled_basis
        self.repairs += inverse.repaired

    def inverse_left(self, matrix: Tensor) -> Tensor:
        """(diag B + δI + V M Vᵀ)⁻¹ X by Woodbury, as prepared at the last refresh."""
        return DiagPlusLowRankInverse(self.inverse_scaled_basis, self.inverse_core, self.inverse_diag).apply_left(
            matrix
        )

    def inverse_right(self, matrix: Tensor) -> Tensor:
        return self.inverse_left(matrix.mT).mT

    def inverse_form(self) -> InverseForm:
        return InverseForm(0.0, self.inverse_diag, self.inverse_scaled_basis, -self.inverse_core)

    def _accumulate(self, rows: Tensor, weight: float | Tensor) -> None:
        self._accumulate_sketch(rows, weight)
        diagonal = rows.square().sum(0)
        add_scaled(self.pending_diag, diagonal, weight)
        add_scaled(self.pending_trace, diagonal.sum(), weight)

    def _add_diagonal(self, diagonal: Tensor, weight: float | Tensor) -> None:
        """A diagonal estimate D: its sketch D·V is a row scaling of the test matrix."""
        add_scaled(self.pending_sketch, diagonal[:, None] * self.test, weight)
        add_scaled(self.pending_diag, diagonal, weight)
        add_scaled(self.pending_trace, diagonal.sum(), weight)

    def _pending(self) -> list[Tensor]:
        return [self.pending_sketch, self.pending_diag]

    def _state(self) -> list[Tensor]:
        return [self.sketch, self.diag]

    def refresh(self) -> None:
        shift = self.diag.max().clamp_min(0.0)
        shifted_sketch = self.sketch - self.diag[:, None] * self.test + shift * self.test
        vectors, values = nystrom_eigh(self.test, shifted_sketch)
        offdiag_values = values - shift
        self.eigenvectors, self.eigenvalues = (
            vectors[:, : self.rank],
            offdiag_values[: self.rank],
        )  # views of the test matrix
        self.test = vectors
        self.sketch = vectors * offdiag_values + self.diag[:, None] * vectors
        self.refreshed = True

    def captured_trace(self) -> Tensor:
        """Σ|m_i| / tr B: weight of the kept off-diagonal part relative to the whole trace."""
        return self.eigenvalues.abs().sum() / self.trace.clamp_min(torch.finfo(self.dtype).tiny)
