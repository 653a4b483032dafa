"""B⁻¹ G A⁻¹ written into the gradient in place for the usual low-rank layer: no gradient-sized temporary.

A low-rank A has the prepared inverse s·I + U diag(c) Uᵀ; B, diagonal plus low rank, has
diag(e) − W K Wᵀ (Woodbury, W = E⁻¹V). With P = GU, Q = WᵀG and S = WᵀP (all small):

    B⁻¹ G A⁻¹ = s·diag(e) G + L R,   L = [diag(e) P diag(c) | W],   R = [Uᵀ ; −K (s·Q + S diag(c) Uᵀ)],

so a step reads G twice (P, Q), then scales it by rows and adds one rank-(k_A + k_B) product, both in
place: four passes over G, the flops of the flop model and no allocation of G's size. The KL clip's
⟨N, G⟩ needs one more read of G (its row norms) and no product N∘G: with L = [L₁ | W], R = [Uᵀ ; R₂],

    ⟨N, G⟩ = s·Σ_i e_i ‖G_i‖² + ⟨L₁, P⟩ + ⟨R₂, Q⟩.

G may come as column blocks (the weight, and an augmented bias's column in the bias gradient), each
with its rows of U; the inner product is then kept per block, so each can carry its own learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FusedKroneckerStep:
    """One layer's natural gradient, planned from small projections and written into its gradient blocks."""

    blocks: list[Tensor]  # column blocks of G (out × in_c), views of .grad: overwritten by apply()
    row_scale: Tensor  # s·e (out,)
    left: Tensor  # L, out × (k_A + k_B)
    rights: list[Tensor]  # R's columns of each block, (k_A + k_B) × in_c
    inner_products: list[Tensor] | None  # ⟨N_c, G_c⟩ per block; None when not asked for

    @classmethod
    def plan(
        cls,
        blocks: list[Tensor],
        right_bases: list[Tensor],
        tail_scale: float,
        coefficients: Tensor,
        inverse_diag: Tensor,
        scaled_basis: Tensor,
        core: Tensor,
        with_inner_products: bool,
    ) -> FusedKroneckerStep:
        """Read each block for P and Q (twice more for the inner products); nothing is written yet.

        ``right_bases[c]`` are the rows of U that block c multiplies; (``tail_scale``, ``coefficients``)
        = (s, c) of A's inverse; (``inverse_diag``, ``scaled_basis``, ``core``) = (e, W, K) of B's.
        """
        partial_projections = [block @ basis for block, basis in zip(blocks, right_bases)]
        projected = partial_projections[0]
        for more in partial_projections[1:]:
            projected = projected + more
        left_projections = [scaled_basis.mT @ block for block in blocks]  # Q_c = Wᵀ G_c
        both = scaled_basis.mT @ projected  # S = Wᵀ P
        both_scaled = both * coefficients
        left = torch.cat([(projected * coefficients) * inverse_diag[:, None], scaled_basis], dim=1)
        rights = [
            torch.cat([basis.mT, -(core @ (tail_scale * q + both_scaled @ basis.mT))])
            for basis, q in zip(right_bases, left_projections)
        ]
        inner_products = None
        if with_inner_products:  # ⟨[A₁|W][Uᵀ; R₂], G⟩ = ⟨A₁, GU⟩ + ⟨R₂, WᵀG⟩: only the row norms read G again
            scaled_projections = left[:, : projected.shape[1]]
            inner_products = [
                tail_scale * (inverse_diag * torch.linalg.vector_norm(block, dim=1).square()).sum()
                + (scaled_projections * part).sum()
                + (right[projected.shape[1] :] * q).sum()
                for block, part, q, right in zip(blocks, partial_projections, left_projections, rights)
            ]
        return cls(blocks, tail_scale * inverse_diag, left, rights, inner_products)

    def apply(self, scale: Tensor | None = None) -> None:
        """G_c ← scale · (s·diag(e) G_c + L R_c), in place: one scaling pass and one addmm per block."""
        row_scale = self.row_scale if scale is None else self.row_scale * scale
        left = self.left if scale is None else self.left * scale
        for block, right in zip(self.blocks, self.rights):
            block.mul_(row_scale[:, None]).addmm_(left, right)
