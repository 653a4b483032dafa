"""The kept orthonormal bases of one layer's factors, and its rows seen in them (shared by rules and layers).

A rule that works in the eigenbasis (EKFAC, SOAP) keeps V (B's side) and U (A's side); a layer pairs its rows in
those coordinates when a rule asks for per-example statistics. Neither needs the other to describe them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


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


def project_rows(rows: Tensor, basis: Tensor, ones_column: bool) -> Tensor:
    """rows @ U, or [rows 1] @ U without the ones column when the bias is augmented."""
    if not ones_column:
        return rows @ basis
    return rows @ basis[..., :-1, :] + basis[..., -1:, :]


#: Given L (…, k_B, n), returns L @ (A-rows in the rotated basis)∘² (…, k_B, k_A): pairs B-rows with A-rows.
RowPairing = Callable[[Tensor], Tensor]
