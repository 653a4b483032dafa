"""Damping and the inverses of the damped factor approximations, applied as operators.

Nothing here forms a d×d matrix unless it is handed a dense eigenbasis (exact mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import safe_eigh

#: (λ, tr A, d_A, tr B, d_B) → (δ_A, δ_B).
DampingSplit = Callable[[float, Tensor, int, Tensor, int], tuple[Tensor, Tensor]]

#: Lower bound on a damping value, as in asdl: keeps 1/(λ+δ) finite for an all-zero factor.
MIN_DAMPING = 1e-7


def pi_damping(damping: float, trace_a: Tensor, dim_a: int, trace_b: Tensor, dim_b: int) -> tuple[Tensor, Tensor]:
    """Factored Tikhonov damping (Martens & Grosse 2015, §6.3): δ_A = π√λ, δ_B = √λ/π.

    π = sqrt((tr A / d_A) / (tr B / d_B)); where a trace is zero or not finite π falls
    back to 1. Branch-free: no host synchronisation.
    """
    ratio = (trace_a / dim_a) / (trace_b / dim_b)
    usable = torch.isfinite(ratio) & (ratio > 0)
    pi = torch.where(usable, ratio, torch.ones_like(ratio)).sqrt()
    root = damping**0.5
    return (root * pi).clamp_min(MIN_DAMPING), (root / pi).clamp_min(MIN_DAMPING)


def relative_damping(damping: float, trace_a: Tensor, dim_a: int, trace_b: Tensor, dim_b: int) -> tuple[Tensor, Tensor]:
    """Damping relative to each factor: δ_A = √λ · tr A / d_A, δ_B = √λ · tr B / d_B (each factor's mean eigenvalue).

    Invariant to the loss's reduction and the gradients' scale (a factor scaled by c gets δ scaled by c), unlike
    π-damping of an absolute λ, whose δ relative to A is √λ / √(mean eig A · mean eig B). Branch-free.
    """
    root = damping**0.5
    return (root * trace_a / dim_a).clamp_min(MIN_DAMPING), (root * trace_b / dim_b).clamp_min(MIN_DAMPING)


#: How λ is split between a layer's two factors, by ``damping_mode``.
DAMPING_SPLITS = {"pi": pi_damping, "relative": relative_damping}


def eigen_inverse_coefficients(
    values: Tensor, damping: Tensor, tail: Tensor | None = None, complete: bool = False
) -> tuple[Tensor, Tensor]:
    """(c, s) such that (U diag(λ) Uᵀ + σ(I − UUᵀ) + δI)⁻¹ X = s·X + (XU ∘ c)Uᵀ, U with orthonormal columns.

    c = 1/(λ+δ) − 1/(σ+δ) and s = 1/(σ+δ); with a square U (``complete``, exact mode) there is no
    rest: c = 1/(λ+δ), s = 0. ``damping`` may carry leading (group) dims, one δ per block.
    Computed once per refresh, so a step applies the inverse without these small kernels.
    """
    shift = damping[..., None]
    if complete:
        return 1.0 / (values + shift), torch.zeros_like(damping)
    tail_value = torch.zeros_like(damping) if tail is None else tail
    tail_scale = 1.0 / (tail_value + damping)
    return 1.0 / (values + shift) - tail_scale[..., None], tail_scale


def apply_eigen_inverse_right(matrix: Tensor, vectors: Tensor, coefficients: Tensor, tail_scale: float) -> Tensor:
    """X ↦ s·X + (XU ∘ c)Uᵀ (see :func:`eigen_inverse_coefficients`): one pass that writes the result.

    ``tail_scale`` is a number (read once when the inverse is prepared), so that addmm scales X
    itself; a square U has no rest. Costs O(rows·d·k).
    """
    projected = (matrix @ vectors) * coefficients
    if vectors.shape[-1] == vectors.shape[-2]:
        return projected @ vectors.mT
    return torch.addmm(matrix, projected, vectors.mT, beta=tail_scale)


@dataclass
class DiagPlusLowRankInverse:
    """(D + δI + V M Vᵀ)⁻¹ by Woodbury, guarded to stay symmetric positive definite.

    With E = D + δ and W = Vᵀ E⁻¹ V, the approximation is SPD iff every eigenvalue ω of
    the k×k matrix I + W^½ M W^½ is positive (it is the approximation whitened by E,
    restricted to span(E^-½ V)). Eigenvalues below δ / max(E), a bound that the true
    damped factor always satisfies, are raised to it and counted in ``repaired``.
    Then (…)⁻¹ X = E⁻¹X − E⁻¹V K Vᵀ E⁻¹ X with K = W^-½ (I − Z Ω⁻¹ Zᵀ) W^-½.
    """

    scaled_basis: Tensor  # E⁻¹V, d×k
    core: Tensor  # K, k×k
    inverse_diag: Tensor  # E⁻¹, d
    repaired: Tensor | None = None  # whitened eigenvalues raised by build() (0-dim); None when not built here

    @classmethod
    def build(cls, diag: Tensor, basis: Tensor, coefficients: Tensor, damping: Tensor) -> DiagPlusLowRankInverse:
        shifted = diag.clamp_min(0.0) + damping
        inverse_diag = 1.0 / shifted
        scaled_basis = basis * inverse_diag[:, None]
        gram = basis.mT @ scaled_basis
        gram_values, gram_vectors = safe_eigh(gram)
        gram_values = gram_values.clamp_min(torch.finfo(gram.dtype).tiny)
        root = (gram_vectors * gram_values.sqrt()) @ gram_vectors.mT
        inverse_root = (gram_vectors * gram_values.rsqrt()) @ gram_vectors.mT
        identity = torch.eye(basis.shape[1], dtype=basis.dtype, device=basis.device)
        whitened = identity + root @ (coefficients[:, None] * root)
        omega, z = safe_eigh(whitened)
        floor = damping / shifted.max()
        repaired = (omega < floor).sum()
        omega = torch.maximum(omega, floor)
        core = inverse_root @ (identity - (z / omega) @ z.mT) @ inverse_root
        return cls(scaled_basis, core, inverse_diag, repaired)

    def apply_left(self, matrix: Tensor) -> Tensor:
        """(D + δI + V M Vᵀ)⁻¹ X for X with d rows; O(d·cols·k): one scaling pass, then one in-place addmm."""
        correction = self.core @ (self.scaled_basis.mT @ matrix)
        return (matrix * self.inverse_diag[:, None]).addmm_(self.scaled_basis, correction, alpha=-1.0)


def kl_clip_scale(kl_clip: float, learning_rate: float, vg_sum: Tensor) -> Tensor:
    """Ba et al. (2017): ν = min(1, sqrt(κ / (η² Σ⟨P, G⟩))); 1 when the product is not positive."""
    budget = learning_rate**2 * vg_sum
    scale = torch.sqrt(kl_clip / budget.clamp_min(torch.finfo(vg_sum.dtype).tiny))
    return torch.where(budget > 0, scale.clamp_max(1.0), torch.ones_like(scale))
