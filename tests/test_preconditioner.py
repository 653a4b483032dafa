"""Woodbury apply vs a literal recursive Sherman–Morrison and float64 solves; the SPD guard."""

from __future__ import annotations

import torch

from lightning_lrkfac.preconditioner import (
    DiagPlusLowRankInverse,
    apply_eigen_inverse_right,
    eigen_inverse_coefficients,
    kl_clip_scale,
    pi_damping,
)

DT = torch.float64


def sherman_morrison_inverse(diag: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """(diag(d) + Σ m_i v_i v_iᵀ)⁻¹ by k literal rank-1 Sherman–Morrison updates (the seed's method)."""
    inverse = torch.diag(1.0 / diag)
    for i in range(basis.shape[1]):
        v, m = basis[:, i : i + 1], coefficients[i]
        iv = inverse @ v
        inverse = inverse - m * (iv @ iv.T) / (1.0 + m * (v.T @ iv))
    return inverse


def random_case(d=40, k=6, negative=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    diag = torch.rand(d, generator=g, dtype=DT) + 0.5
    basis = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=DT))[0]
    coefficients = torch.rand(k, generator=g, dtype=DT) * 3
    if negative:
        coefficients[-2:] = -0.2  # still SPD: the diagonal dominates
    return diag, basis, coefficients


def test_woodbury_equals_recursive_sherman_morrison_and_solve():
    for negative in (False, True):
        diag, basis, coefficients = random_case(negative=negative)
        damping = torch.tensor(0.3, dtype=DT)
        x = torch.randn(40, 7, dtype=DT)
        inverse = DiagPlusLowRankInverse.build(diag, basis, coefficients, damping)
        assert int(inverse.repaired) == 0
        got = inverse.apply_left(x)
        dense = torch.diag(diag + damping) + basis @ torch.diag(coefficients) @ basis.T
        torch.testing.assert_close(got, torch.linalg.solve(dense, x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            got, sherman_morrison_inverse(diag + damping, basis, coefficients) @ x, rtol=1e-10, atol=1e-12
        )


def test_spd_guard_detects_and_repairs_an_indefinite_approximation():
    diag, basis, coefficients = random_case()
    coefficients[0] = -5.0  # far below −(diag + δ): the damped approximation is indefinite
    damping = torch.tensor(0.1, dtype=DT)
    dense = torch.diag(diag + damping) + basis @ torch.diag(coefficients) @ basis.T
    assert torch.linalg.eigvalsh(dense).min() < 0
    inverse = DiagPlusLowRankInverse.build(diag, basis, coefficients, damping)
    assert int(inverse.repaired) == 1
    operator = inverse.apply_left(torch.eye(40, dtype=DT))
    torch.testing.assert_close(operator, operator.T, rtol=1e-10, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(operator)
    assert eigenvalues.min() > 0
    # The repair raises the offending whitened eigenvalue to δ / max(E), a bound the true
    # damped factor satisfies, so no direction gains more than max(E) / (δ·min(E)).
    shifted = diag + damping
    assert eigenvalues.max() <= shifted.max() / (damping * shifted.min()) + 1e-9
    # Without the offending component, nothing is repaired and the inverse is exact.
    clean = DiagPlusLowRankInverse.build(diag, basis[:, 1:], coefficients[1:], damping)
    assert int(clean.repaired) == 0


def test_eig_inverse_with_isotropic_tail_matches_dense_solve():
    d, k = 30, 5
    vectors = torch.linalg.qr(torch.randn(d, k, dtype=DT))[0]
    values = torch.rand(k, dtype=DT) * 4
    tail, damping = torch.tensor(0.2, dtype=DT), torch.tensor(0.05, dtype=DT)
    dense = (
        vectors @ torch.diag(values) @ vectors.T
        + tail * (torch.eye(d, dtype=DT) - vectors @ vectors.T)
        + damping * torch.eye(d, dtype=DT)
    )
    x = torch.randn(8, d, dtype=DT)

    def inverse_right(vectors, values, tail=None):  # prepared once, then applied, as a factor does
        coefficients, tail_scale = eigen_inverse_coefficients(
            values, damping, tail, vectors.shape[0] == vectors.shape[1]
        )
        return apply_eigen_inverse_right(x, vectors, coefficients, float(tail_scale))

    torch.testing.assert_close(inverse_right(vectors, values, tail), torch.linalg.solve(dense, x.T).T)
    no_tail = vectors @ torch.diag(values) @ vectors.T + damping * torch.eye(d, dtype=DT)
    torch.testing.assert_close(inverse_right(vectors, values), torch.linalg.solve(no_tail, x.T).T)
    full_values, full_vectors = torch.linalg.eigh(dense)  # a complete basis (exact mode): no rest
    torch.testing.assert_close(inverse_right(full_vectors, full_values - damping), torch.linalg.solve(dense, x.T).T)


def test_pi_damping_balances_traces_and_falls_back_to_one():
    da, db = pi_damping(1e-2, torch.tensor(8.0), 2, torch.tensor(1.0), 4)
    pi = (4.0 / 0.25) ** 0.5
    assert abs(float(da) - 0.1 * pi) < 1e-6 and abs(float(db) - 0.1 / pi) < 1e-6
    da, db = pi_damping(1e-2, torch.tensor(0.0), 2, torch.tensor(0.0), 4)
    assert abs(float(da) - 0.1) < 1e-7 and abs(float(db) - 0.1) < 1e-7


def test_kl_clip_scale():
    scale = kl_clip_scale(1e-3, 0.1, torch.tensor(1.0))  # η²·vg = 0.01 > κ → ν = sqrt(0.1)
    assert abs(float(scale) - 0.1**0.5) < 1e-6
    assert float(kl_clip_scale(1e-3, 0.1, torch.tensor(1e-3))) == 1.0
    assert float(kl_clip_scale(1e-3, 0.1, torch.tensor(-1.0))) == 1.0
