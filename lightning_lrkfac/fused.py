"""B⁻¹ G A⁻¹ written into the gradient in place for the usual low-rank layer: no gradient-sized temporary.

A low-rank A has the prepared inverse s·I + U diag(c) Uᵀ; B, diagonal plus low rank, has
diag(e) − W K Wᵀ (Woodbury, W = E⁻¹V). With P = GU, Q = WᵀG and S = WᵀP (all small):

    B⁻¹ G A⁻¹ = s·diag(e) G + L R,   L = [diag(e) P diag(c) | W],   R = [Uᵀ ; −K (s·Q + S diag(c) Uᵀ)],

so a step reads G twice (P, Q), then scales it by rows and adds one rank-(k_A + k_B) product, both in
place: four passes over G, the flops of the flop model and no allocation of G's size. The KL clip's
⟨N, G⟩ needs one more read of G (its row norms) and no product N∘G: with L = [L₁ | W], R = [Uᵀ ; R₂],

    ⟨N, G⟩ = s·Σ_i e_i ‖G_i‖² + ⟨L₁, P⟩ + ⟨R₂, Q⟩.

G is the weight gradient plus, for an augmented bias, its column (a view of the bias gradient, U's
last row): nothing is concatenated, and ⟨N, G⟩ splits into the weight's and the bias's parts when
they have their own learning rates. A B kept whole (Q diag(c) Qᵀ, a classifier head) is the case
e = None: L = Q, R = R₂, written over G.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Gradients with fewer entries take the general path: there its fewer, larger kernels cost less
#: than the passes this path saves (2 CPU cores, an MLP's preconditioning: 256×257 1.18× slower
#: in place, 384×385 1.8× faster, 1024×1025 3.4× faster).
MIN_ELEMENTS = 1 << 17


@dataclass
class FusedKroneckerStep:
    """One layer's natural gradient, planned from small projections and written into its gradient in place."""

    weight: Tensor  # G's weight columns (out × in), a view of .grad: overwritten by apply()
    bias: Tensor | None  # the augmented bias column (out,), a view of the bias's .grad, or None
    row_scale: Tensor | None  # s·e (out,); None without a diagonal part
    left: Tensor  # L, out × (k_A + k_B)
    right: Tensor  # R, (k_A + k_B) × in'
    #: ⟨N, G⟩ as [total] or, split, as [weight part, bias part]; None when not asked for.
    inner_products: list[Tensor] | None

    @classmethod
    def plan(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        basis: Tensor,
        tail_scale: float,
        coefficients: Tensor,
        inverse_diag: Tensor | None,
        scaled_basis: Tensor,
        middle: Tensor,
        products_wanted: str = "none",
    ) -> FusedKroneckerStep:
        """Read G for P and Q (once more for the inner products); nothing is written yet.

        ``basis`` is U (in' × k_A, its last row the bias column's when ``bias`` is given); (``tail_scale``,
        ``coefficients``) = (s, c) of A's inverse; (``inverse_diag``, ``scaled_basis``, ``middle``) = (e, W, −K)
        of B's (:class:`.lowrank.InverseForm`), −K a matrix or a vector (diagonal), e None for a B kept whole
        (W its eigenvectors, −K the inverse eigenvalues: no diagonal part, so L = W and R = R₂). ``products_wanted``: "none", "total"
        (one ⟨N, G⟩) or "split" (the weight's and the bias's).
        """
        columns = weight.shape[1]
        basis = basis[: columns + int(bias is not None)]  # an augmented bias without a gradient: its column is 0
        projected = weight @ basis[:columns]  # P = G U
        projections = torch.mm(scaled_basis.mT, weight)  # Q = Wᵀ G
        bias_projected = None
        if bias is not None:
            bias_projected = torch.outer(bias, basis[columns])
            projected = projected + bias_projected
            projections = torch.cat([projections, (scaled_basis.mT @ bias)[:, None]], dim=1)
        both_scaled = (scaled_basis.mT @ projected) * coefficients  # S diag(c)
        rest = torch.addmm(projections, both_scaled, basis.mT, beta=tail_scale)  # s·Q + S diag(c) Uᵀ
        rest = torch.mm(middle, rest) if middle.dim() == 2 else middle[:, None] * rest  # R₂ = −K (s·Q + S diag(c) Uᵀ)
        if inverse_diag is None:
            products = (
                None if products_wanted == "none" else cls._rest_products(rest, projections, products_wanted, bias)
            )
            return cls(weight, bias, None, scaled_basis, rest, products)
        scaled_projections = projected * coefficients * inverse_diag[:, None]  # L₁ = diag(e) P diag(c)
        left = torch.cat([scaled_projections, scaled_basis], dim=1)
        right = torch.cat([basis.mT, rest])
        products = None
        if products_wanted != "none":  # ⟨[L₁|W][Uᵀ; R₂], G⟩ = ⟨L₁, P⟩ + ⟨R₂, Q⟩: only the row norms read G again
            weight_rows = torch.linalg.vector_norm(weight, dim=1).square()
            rests = cls._rest_products(rest, projections, products_wanted, bias)
            if products_wanted == "split" and bias is not None:
                products = [
                    tail_scale * torch.dot(inverse_diag, weight_rows)
                    + (scaled_projections * (projected - bias_projected)).sum()
                    + rests[0],
                    tail_scale * torch.dot(inverse_diag, bias.square())
                    + (scaled_projections * bias_projected).sum()
                    + rests[1],
                ]
            else:
                if bias is not None:
                    weight_rows = weight_rows.addcmul_(bias, bias)
                products = [
                    tail_scale * torch.dot(inverse_diag, weight_rows)
                    + torch.dot(scaled_projections.view(-1), projected.view(-1))
                    + rests[0]
                ]
        return cls(weight, bias, tail_scale * inverse_diag, left, right, products)

    @staticmethod
    def _rest_products(rest: Tensor, projections: Tensor, products_wanted: str, bias: Tensor | None) -> list[Tensor]:
        """⟨R₂, Q⟩, as one sum or split into the weight's columns and the bias's."""
        if products_wanted == "split" and bias is not None:
            return [(rest[:, :-1] * projections[:, :-1]).sum(), torch.dot(rest[:, -1], projections[:, -1])]
        return [torch.dot(rest.view(-1), projections.view(-1))]

    def apply(self, scale: Tensor | None = None) -> None:
        """G ← scale · (s·diag(e) G + L R), in place: one scaling pass and one addmm (and the bias column's);
        without a diagonal part, G ← scale · L R written over G."""
        left = self.left if scale is None else self.left * scale
        columns = self.weight.shape[1]
        if self.row_scale is None:
            self.weight.addmm_(left, self.right[:, :columns], beta=0.0)
            if self.bias is not None:
                self.bias.addmv_(left, self.right[:, columns], beta=0.0)
            return
        row_scale = self.row_scale if scale is None else self.row_scale * scale
        self.weight.mul_(row_scale[:, None]).addmm_(left, self.right[:, :columns])
        if self.bias is not None:
            self.bias.mul_(row_scale).addmv_(left, self.right[:, columns])
