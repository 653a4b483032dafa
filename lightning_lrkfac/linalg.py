"""Small dense linear-algebra kernels for the low-rank path: all O(d·m²) or O(m³)."""

from __future__ import annotations

import torch
from torch import Tensor


def random_orthonormal(dim: int, cols: int, generator: torch.Generator, device, dtype) -> Tensor:
    """A dim×cols matrix with orthonormal columns, drawn on the CPU generator for reproducibility."""
    gaussian = torch.randn(dim, cols, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gaussian)[0].to(device=device, dtype=dtype).contiguous()  # row-major, as after a refresh


def nystrom_eigh(test: Tensor, sketch: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the Nyström approximation S ≈ Y (VᵀY)⁺ Yᵀ of a PSD matrix S.

    ``test`` is V (d×m, orthonormal columns) and ``sketch`` is Y = S·V. This is the
    numerically stable single-pass form of Tropp et al. (2017): shift by ν, take a
    symmetric square root of the m×m core, QR + small SVD. Returns (U, θ) with U d×m
    orthonormal and θ ≥ 0 sorted in descending order. Never forms a d×d matrix.
    """
    sketch = torch.nan_to_num(sketch, nan=0.0, posinf=0.0, neginf=0.0)
    scale = torch.linalg.matrix_norm(sketch).clamp_min(torch.finfo(sketch.dtype).tiny)
    sketch = sketch / scale  # the decomposition is scale-free; this keeps squares in range
    nu = torch.finfo(sketch.dtype).eps * 4.0
    shifted = sketch + nu * test
    core_vals, core_vecs = safe_eigh(test.mT @ shifted)
    core_vals = core_vals.clamp_min(nu)
    factor = shifted @ (core_vecs * core_vals.rsqrt())  # F with F Fᵀ = Y_ν core⁻¹ Y_νᵀ
    q, r = torch.linalg.qr(factor)
    small_u, singular, _ = torch.linalg.svd(r)
    vectors = q @ small_u
    values = (singular.square() - nu).clamp_min(0.0) * scale
    return vectors, values


def safe_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition (ascending) of the symmetric part of ``matrix``.

    Non-finite entries are zeroed first: a diverging run then yields garbage that the
    validity checks discard, instead of a LinAlgError deep inside a training step.
    """
    symmetric = torch.nan_to_num(0.5 * (matrix + matrix.mT), nan=0.0, posinf=0.0, neginf=0.0)
    try:
        return torch.linalg.eigh(symmetric)
    except torch.linalg.LinAlgError:  # LAPACK did not converge (entries near overflow, a diverging run)
        return _rescaled_eigh(symmetric)


def _rescaled_eigh(symmetric: Tensor) -> tuple[Tensor, Tensor]:
    """eigh of a matrix LAPACK failed on: divided by its largest entry, in float64, nudged off exact repeats."""
    scale = symmetric.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(symmetric.dtype).tiny)
    normalised = (symmetric / scale).double()
    eye = torch.eye(symmetric.shape[-1], dtype=torch.float64, device=symmetric.device)
    values, vectors = torch.linalg.eigh(normalised + 1e-12 * eye)
    return (values * scale[..., 0].double()).to(symmetric.dtype), vectors.to(symmetric.dtype)


def symmetric_eigh_desc(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric matrix with eigenvalues in descending order."""
    values, vectors = safe_eigh(matrix)
    return values.flip(-1), vectors.flip(-1).contiguous()  # row-major, the layout a restored checkpoint has
