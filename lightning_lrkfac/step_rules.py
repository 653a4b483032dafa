"""What a layer's step does with its curvature: plain K-FAC, EKFAC, or Adam in the eigenbasis (SOAP).

The two eigenbasis rules work in the rotated coordinates C = Vᵀ G U of the kept bases:
U, the kept eigenvectors of A (all of them in exact mode; the standard basis for a
diagonal A), and V, the Rayleigh–Ritz vectors of B's approximation in its kept subspace.
With P the Frobenius-orthogonal projector G ↦ V Vᵀ G U Uᵀ onto that core, a step is
S(P G) + Π(P⊥ G), a rule on the core plus a rule on the rest, so each keeps its meaning:

- ``ekfac`` (George et al. 2018): the core is divided by running second moments of the
  per-example gradients in the rotated basis, C / (s + λ), instead of by the Kronecker
  product of the eigenvalues; the rest keeps K-FAC's inverse, projected, P⊥ K P⊥. SPD.
- ``soap`` (Vyas et al. 2024): Adam in the rotated coordinates on the core (first moment
  kept in the original coordinates, second moment in the rotated ones) and Adam with its
  usual diagonal on the rest. The direction is Adam's normalised step: use it with a plain
  SGD (no momentum), whose learning rate is then Adam's.

At each refresh the bases turn. Second moments follow them by the squared rotation
(s ↦ (R_B∘R_B) s (R_A∘R_A)ᵀ with R = newᵀ·old, exact for a permutation or sign flip);
the share of a new direction that was outside the old core takes K-FAC's λ_B λ_A (EKFAC)
or the rest's diagonal moments (SOAP). Everything here is O(d·k) state, O(d_in·d_out·k) work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .linalg import safe_eigh
from .lowrank import DiagonalFactor, DiagPlusLowRankFactor, add_scaled, all_finite

if TYPE_CHECKING:
    from .fused import FusedKroneckerStep
    from .layers import KFACLayer

STEP_RULES = ("kfac", "ekfac", "soap")


@dataclass
class Bases:
    """The kept orthonormal bases of one layer: V (…, out, k_B) and U (…, in, k_A), or U = None (standard basis)."""

    left: Tensor
    left_values: Tensor
    right: Tensor | None
    right_values: Tensor

    @property
    def complete(self) -> bool:
        """True when the core is everything (exact mode): no rest to treat."""
        left_square = self.left.shape[-1] == self.left.shape[-2]
        return left_square and (self.right is None or self.right.shape[-1] == self.right.shape[-2])

    def core(self, matrix: Tensor) -> Tensor:
        """Vᵀ X U: a matrix in the rotated coordinates."""
        rotated = self.left.mT @ matrix
        return rotated if self.right is None else rotated @ self.right

    def expand(self, core: Tensor) -> Tensor:
        """V C Uᵀ: back to the original coordinates."""
        rotated = core if self.right is None else core @ self.right.mT
        return self.left @ rotated

    @property
    def core_shape(self) -> tuple[int, ...]:
        """Shape (…, k_B, k_A) of the rotated coordinates; k_A is A's dimension for the standard basis."""
        return (*self.left.shape[:-2], self.left.shape[-1], self.right_values.shape[-1])

    def add_expanded(self, matrix: Tensor, core: Tensor) -> Tensor:
        """X + V C Uᵀ, written into X."""
        return matrix.add_(self.expand(core))

    def transport(self, previous: Bases, moments: Tensor) -> tuple[Tensor, Tensor]:
        """(second moments carried from ``previous``'s coordinates into these, share of each entry that was covered).

        An entry's variance moves by the squared rotation; the share is 1 where the new
        direction lay inside the old core, less where part of it came from outside.
        """
        left_weights = (self.left.mT @ previous.left).square()
        carried = left_weights @ moments
        covered = left_weights.sum(-1, keepdim=True)
        if self.right is not None:
            right_weights = (self.right.mT @ previous.right).square()
            carried = carried @ right_weights.mT
            covered = covered * right_weights.sum(-1).unsqueeze(-2)
        return carried, covered.clamp(0.0, 1.0)

    def spread_diagonal(self, diagonal_moments: Tensor) -> Tensor:
        """Moments kept per original coordinate (a diagonal), seen in the rotated coordinates: (V∘V)ᵀ D (U∘U)."""
        spread = self.left.square().mT @ diagonal_moments
        return spread if self.right is None else spread @ self.right.square()


def layer_bases(layer: KFACLayer) -> Bases:
    """U from A (its eigenvectors, or None for a diagonal A) and V from B (Rayleigh–Ritz in the kept subspace)."""
    a_factor, b_factor = layer.factors
    if isinstance(a_factor, DiagonalFactor):
        right, right_values = None, a_factor.diag.clamp_min(0.0)
    else:
        right, right_values = a_factor.eigenvectors, a_factor.eigenvalues.clamp_min(0.0)
    left, left_values = b_factor.eigenvectors, b_factor.eigenvalues
    if isinstance(b_factor, DiagPlusLowRankFactor):
        # B̃ = D + V M Vᵀ restricted to span V is VᵀDV + M; its eigenvectors turn V into the
        # directions that diagonalise B̃ there (the eigenvectors of B − diag B do not).
        restricted = left.mT @ (b_factor.diag.clamp_min(0.0)[:, None] * left) + torch.diag_embed(left_values)
        values, vectors = safe_eigh(restricted)
        left, left_values = left @ vectors.flip(-1), values.flip(-1)
    return Bases(left.contiguous(), left_values.clamp_min(0.0), right, right_values)


def project_rows(rows: Tensor, basis: Tensor, ones_column: bool) -> Tensor:
    """rows @ U, or [rows 1] @ U without the ones column when the bias is augmented."""
    if not ones_column:
        return rows @ basis
    return rows @ basis[..., :-1, :] + basis[..., -1:, :]


#: Given L (…, k_B, n), returns L @ (A-rows in the rotated basis)∘² (…, k_B, k_A): pairs B-rows with A-rows.
RowPairing = Callable[[Tensor], Tensor]


class StepRule:
    """Plain K-FAC, (B + δ_B)⁻¹ G (A + δ_A)⁻¹, and the interface of the other rules (which keep state)."""

    #: Whether :meth:`accumulate_rows` wants per-example rows (paired A and B rows) at record time.
    wants_rows = False
    #: Micro-batches in the pending statistics.
    pending_count = 0

    def __init__(self, layer: KFACLayer) -> None:
        self.layer = layer
        self.bases: Bases | None = None

    def rebase(self) -> None:
        """The layer's factors were refreshed (and its inverses prepared): take the new bases."""

    def precondition(self, grads: list[Tensor], damping: float, finite: Tensor | None = None) -> list[Tensor]:
        """The step for this layer's gradient blocks. ``finite`` (a bool tensor, under AMP) is False when the
        scaler will skip this step: a rule that keeps moments must then leave them unchanged."""
        return self.layer.precondition(grads)

    def fused_step(self, inner_products: str = "none") -> FusedKroneckerStep | None:
        """This step planned to be written into the gradient in place, where the layer's factors allow it
        (``inner_products``: see :meth:`.FusedKroneckerStep.plan`); None: use :meth:`precondition`."""
        return self.layer.fused_step(inner_products)

    def accumulate_rows(self, b_rows: Tensor, pairing: RowPairing, weight: float | Tensor) -> None:
        """Per-example statistics of one micro-batch (rules with :attr:`wants_rows`)."""

    def pending_tensors(self) -> list[Tensor]:
        return []

    def fold(self, decay: float, count: int, valid: Tensor) -> None:
        """EMA-fold the pending statistics (``count`` micro-batches) where ``valid``."""

    def discard_pending(self) -> None:
        """Drop the pending statistics of a skipped step."""

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything to checkpoint, as fixed-shape tensors."""
        return {}

    def after_load(self) -> None:
        """The state tensors were loaded: rebuild what derives from them."""


class StatefulRule(StepRule):
    """A rule whose bases and moments are checkpointed: they live in fixed-shape tensors from construction."""

    def __init__(self, layer: KFACLayer) -> None:
        super().__init__(layer)
        reference = layer.factors[1].trace
        self.initialized = torch.zeros((), dtype=torch.bool, device=reference.device)
        template = layer_bases(layer)
        self._bases_tensors = {
            "left": torch.zeros_like(template.left),
            "left_values": torch.zeros_like(template.left_values),
            "right_values": torch.zeros_like(template.right_values),
        }
        if template.right is not None:
            self._bases_tensors["right"] = torch.zeros_like(template.right)

    def fused_step(self, inner_products: str = "none") -> FusedKroneckerStep | None:
        return None  # the step is the rule's own

    def _stored_bases(self) -> Bases:
        t = self._bases_tensors
        return Bases(t["left"], t["left_values"], t.get("right"), t["right_values"])

    def rebase(self) -> None:
        new = layer_bases(self.layer)
        previous = self._stored_bases() if self.bases is not None else None
        self._move_moments(previous, new)
        for name, tensor in self._bases_tensors.items():
            tensor.copy_(getattr(new, name))
        self.bases = self._stored_bases()
        self.initialized.fill_(True)

    def _move_moments(self, previous: Bases | None, new: Bases) -> None:
        """Carry the rule's moments into the new coordinates (``previous`` None: the first bases)."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, Tensor]:
        return {"initialized": self.initialized, **{f"bases.{k}": v for k, v in self._bases_tensors.items()}}

    def after_load(self) -> None:
        self.bases = self._stored_bases() if bool(self.initialized) else None


class EKFACRule(StatefulRule):
    """EKFAC on the kept core, C / (s + λ) with s the running E[(Vᵀ g_i U)²]; projected K-FAC on the rest."""

    wants_rows = True

    def __init__(self, layer: KFACLayer) -> None:
        super().__init__(layer)
        reference = layer.factors[1].trace
        self.scaling = torch.zeros(self._stored_bases().core_shape, dtype=reference.dtype, device=reference.device)
        self.pending = torch.zeros_like(self.scaling)
        self.pending_count = 0

    def accumulate_rows(self, b_rows: Tensor, pairing: RowPairing, weight: float | Tensor) -> None:
        """pending s += weight · Σ_rows (Vᵀ b)²(Uᵀ a)²ᵀ, in the bases in use (nothing before the first bases)."""
        if self.bases is None:
            return
        left = (b_rows @ self.bases.left).square().mT  # (…, k_B, n)
        add_scaled(self.pending, pairing(left), weight)
        self.pending_count += 1

    def pending_tensors(self) -> list[Tensor]:
        return [self.pending]

    def fold(self, decay: float, count: int, valid: Tensor) -> None:
        if self.pending_count == 0:
            return
        updated = self.pending.mul_((1.0 - decay) / count).add_(self.scaling, alpha=decay)
        self.scaling.copy_(torch.where(valid & all_finite([updated]), updated, self.scaling))
        self.discard_pending()

    def discard_pending(self) -> None:
        self.pending.zero_()
        self.pending_count = 0

    def _move_moments(self, previous: Bases | None, new: Bases) -> None:
        kronecker = new.left_values[..., :, None] * new.right_values[..., None, :]  # K-FAC's λ_B λ_A
        if previous is None:
            self.scaling.copy_(kronecker)
            return
        carried, covered = new.transport(previous, self.scaling)
        self.scaling.copy_(carried + (1.0 - covered) * kronecker)

    def precondition(self, grads: list[Tensor], damping: float, finite: Tensor | None = None) -> list[Tensor]:
        bases = self.bases  # s changes only when statistics fold, which AMP's skipped steps never do
        core = bases.core(grads[0])
        rescaled = core / (self.scaling + damping)
        if bases.complete:
            natural = bases.expand(rescaled)
        else:  # K-FAC on P⊥G, projected back onto P⊥, plus the rescaled core
            rest = grads[0] - bases.expand(core)
            natural = self.layer.precondition([rest])[0]
            natural = bases.add_expanded(natural, rescaled - bases.core(natural))
        naturals = [natural.contiguous()]
        if len(grads) > 1:  # a separate bias block keeps K-FAC's B⁻¹ g_b
            naturals.append(self.layer.factors[1].inverse_left(grads[1]).contiguous())
        return naturals

    def state_tensors(self) -> dict[str, Tensor]:
        return {**super().state_tensors(), "scaling": self.scaling}


class AdamMoments:
    """Adam's two moments for one block: m in the original coordinates, v on the core and on the rest."""

    def __init__(self, shape: torch.Size, core_shape: tuple[int, ...], complete: bool, like: Tensor) -> None:
        self.first = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.core_second = torch.zeros(core_shape, dtype=like.dtype, device=like.device)
        self.rest_second = None if complete else torch.zeros(shape, dtype=like.dtype, device=like.device)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        named = {f"{prefix}.first": self.first, f"{prefix}.core_second": self.core_second}
        if self.rest_second is not None:
            named[f"{prefix}.rest_second"] = self.rest_second
        return named


class EigenAdamRule(StatefulRule):
    """SOAP: Adam on the core in the rotated coordinates, Adam with its diagonal on the rest."""

    def __init__(self, layer: KFACLayer, beta1: float, beta2: float, eps: float) -> None:
        super().__init__(layer)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        reference, template = layer.factors[1].trace, self._stored_bases()  # the shapes of the bases
        widths = [layer.in_dim] + ([1] if layer.has_bias and not layer.augment else [])  # a separate bias column
        self.blocks = []
        for index, width in enumerate(widths):
            bases = self._block_bases(index, template)
            shape = torch.Size((*layer.blocks, layer.out_dim, width))
            self.blocks.append(AdamMoments(shape, bases.core_shape, bases.complete, reference))
        self.updates = torch.zeros((), dtype=torch.int64, device=reference.device)

    def _block_bases(self, index: int, bases: Bases) -> Bases:
        """The weight block's bases, or for a separate bias (A = 1) V with the one-column standard basis."""
        if index == 0:
            return bases
        ones = torch.ones_like(bases.right_values[..., :1])
        return Bases(bases.left, bases.left_values, None, ones)

    def _move_moments(self, previous: Bases | None, new: Bases) -> None:
        if previous is None:
            return  # moments start at zero, as Adam's
        for index, block in enumerate(self.blocks):
            old, fresh = self._block_bases(index, previous), self._block_bases(index, new)
            carried, covered = fresh.transport(old, block.core_second)
            if block.rest_second is not None:  # what came from outside the old core: the rest's diagonal moments
                carried = carried + (1.0 - covered) * fresh.spread_diagonal(block.rest_second)
            block.core_second.copy_(carried)

    def precondition(self, grads: list[Tensor], damping: float, finite: Tensor | None = None) -> list[Tensor]:
        moments = [self.updates, *(t for block in self.blocks for t in block.tensors("").values())]
        previous = None if finite is None else [t.clone() for t in moments]
        self.updates += 1
        steps = self.updates.to(grads[0].dtype)
        first_correction = 1.0 - self.beta1**steps
        second_correction = 1.0 - self.beta2**steps
        directions = [
            self._adam(block, self._block_bases(index, self.bases), grad, first_correction, second_correction)
            for index, (block, grad) in enumerate(zip(self.blocks, grads))
        ]
        if previous is not None:  # a step the AMP scaler skips leaves Adam's moments as they were (no host sync)
            for tensor, old in zip(moments, previous):
                tensor.copy_(torch.where(finite, tensor, old))
        return directions

    def _adam(
        self, block: AdamMoments, bases: Bases, grad: Tensor, first_correction: Tensor, second_correction: Tensor
    ) -> Tensor:
        beta1, beta2 = self.beta1, self.beta2
        block.first.lerp_(grad, 1.0 - beta1)
        core_grad, core_first = bases.core(grad), bases.core(block.first)
        block.core_second.mul_(beta2).addcmul_(core_grad, core_grad, value=1.0 - beta2)
        core_denominator = (block.core_second / second_correction).sqrt_().add_(self.eps).mul_(first_correction)
        core_step = core_first / core_denominator
        if block.rest_second is None:
            return bases.expand(core_step).contiguous()
        rest_grad = grad - bases.expand(core_grad)
        block.rest_second.mul_(beta2).addcmul_(rest_grad, rest_grad, value=1.0 - beta2)
        rest_denominator = (block.rest_second / second_correction).sqrt_().add_(self.eps).mul_(first_correction)
        rest_step = (block.first - bases.expand(core_first)).div_(rest_denominator)
        return bases.add_expanded(rest_step, core_step - bases.core(rest_step)).contiguous()

    def state_tensors(self) -> dict[str, Tensor]:
        named = {**super().state_tensors(), "updates": self.updates}
        for index, block in enumerate(self.blocks):
            named.update(block.tensors(f"block{index}"))
        return named
