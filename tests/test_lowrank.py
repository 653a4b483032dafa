"""Streaming low-rank factors against float64 eigendecompositions of known matrices."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lrkfac.lowrank import DenseFactor, DiagonalFactor, DiagPlusLowRankFactor, LowRankFactor, fold_groups

DT = torch.float64
CPU = torch.device("cpu")


def matrix_with_spectrum(values: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=DT))[0]
    return (basis * values) @ basis.T, basis


def feed(factor, matrix: torch.Tensor, decay: float = 0.0) -> None:
    """One fold of exactly ``matrix``: rows R with RᵀR = matrix (its symmetric square root)."""
    values, vectors = torch.linalg.eigh(matrix)
    factor.accumulate((vectors * values.clamp_min(0).sqrt()) @ vectors.T, 1.0)
    factor.fold(decay, torch.tensor(True))


def subspace_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine of the principal angles between span(a) and span(b)."""
    return float(torch.linalg.svdvals(a.T @ b).min())


def iterations_to_converge(factor, matrix, reference_values, tol=1e-3, limit=60) -> int:
    for i in range(1, limit + 1):
        feed(factor, matrix)
        factor.refresh()
        if float(((factor.eigenvalues - reference_values).abs() / reference_values).max()) < tol:
            return i
    return limit + 1


def new_factor(cls, dim, rank, oversampling=4, seed=0, **kwargs):
    return cls(dim, rank, oversampling, torch.Generator().manual_seed(seed), CPU, DT, **kwargs)


def test_subspace_iteration_recovers_top_k_eigenpairs_of_known_spectrum():
    d, k = 200, 8
    spectrum = torch.cat(
        [torch.tensor([50.0, 40, 30, 20, 15, 12, 10, 8], dtype=DT), torch.linspace(2, 0.01, d - k, dtype=DT)]
    )
    matrix, basis = matrix_with_spectrum(spectrum)
    factor = new_factor(LowRankFactor, d, k)
    for _ in range(15):
        feed(factor, matrix)
        factor.refresh()
    torch.testing.assert_close(factor.eigenvalues, spectrum[:k], rtol=1e-6, atol=0)
    assert subspace_cosine(factor.eigenvectors, basis[:, :k]) > 1 - 1e-6
    torch.testing.assert_close(factor.trace, spectrum.sum())
    torch.testing.assert_close(factor.captured_trace(), spectrum[:k].sum() / spectrum.sum())


def test_warm_start_needs_fewer_iterations_than_cold_start():
    d, k = 300, 10
    spectrum = 1.0 / torch.arange(1, d + 1, dtype=DT)
    matrix, _ = matrix_with_spectrum(spectrum, seed=1)
    perturbation, _ = matrix_with_spectrum(torch.rand(d, dtype=DT) * 0.01, seed=2)
    moved = matrix + perturbation
    reference = torch.linalg.eigvalsh(moved).flip(0)[:k]
    warm = new_factor(LowRankFactor, d, k, seed=3)
    iterations_to_converge(warm, matrix, torch.linalg.eigvalsh(matrix).flip(0)[:k])
    warm_iterations = iterations_to_converge(warm, moved, reference)
    cold_iterations = iterations_to_converge(new_factor(LowRankFactor, d, k, seed=4), moved, reference)
    assert warm_iterations < cold_iterations, (warm_iterations, cold_iterations)


def test_streaming_ema_tracks_the_exact_running_average():
    """design.md §2 sanity check: d=512, k=16, p=8, ρ=0.95, one refresh per batch."""
    d, k, n, decay = 512, 16, 64, 0.95
    g = torch.Generator().manual_seed(5)
    spectrum = 1.0 / torch.arange(1, d + 1, dtype=DT)
    _, basis = matrix_with_spectrum(spectrum, seed=6)
    mixing = basis * spectrum.sqrt()
    factor = new_factor(LowRankFactor, d, k, oversampling=8)
    exact = torch.zeros(d, d, dtype=DT)
    for step in range(300):
        rows = torch.randn(n, d, generator=g, dtype=DT) @ mixing.T
        factor.accumulate(rows, 1.0 / n)
        factor.fold(decay, torch.tensor(True))
        factor.refresh()
        exact = rows.T @ rows / n if step == 0 else decay * exact + (1 - decay) * rows.T @ rows / n
    values, vectors = torch.linalg.eigh(exact)
    values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    assert float(((factor.eigenvalues - values).abs() / values).max()) < 0.02
    assert subspace_cosine(factor.eigenvectors[:, :8], vectors[:, :8]) > 0.99
    torch.testing.assert_close(factor.trace, exact.trace())


def test_diag_plus_low_rank_factor_keeps_the_algebraically_largest_part():
    """B − diag B has zero trace; the rank-k part must be its algebraically largest eigenpairs."""
    d, k = 120, 4
    g = torch.Generator().manual_seed(7)
    structure = torch.linalg.qr(torch.randn(d, 6, generator=g, dtype=DT))[0]
    weights = torch.tensor([5.0, 4, 3, 2.5, 1, 0.5], dtype=DT)
    diagonal = torch.rand(d, generator=g, dtype=DT) * 3 + 0.2
    matrix = torch.diag(diagonal) + (structure * weights) @ structure.T
    offdiag = matrix - torch.diag(torch.diag(matrix))
    values, vectors = torch.linalg.eigh(offdiag)
    assert values.min() < -0.1 and values.max() > 0  # indefinite, as always
    factor = new_factor(DiagPlusLowRankFactor, d, k, oversampling=6)
    for _ in range(40):
        feed(factor, matrix)
        factor.refresh()
    torch.testing.assert_close(factor.diag, torch.diag(matrix))
    torch.testing.assert_close(factor.eigenvalues, values.flip(0)[:k], rtol=1e-4, atol=1e-6)
    assert subspace_cosine(factor.eigenvectors, vectors.flip(1)[:, :k]) > 0.999


def test_low_rank_state_is_order_k_times_d():
    d, k, p = 4096, 32, 8
    factor = new_factor(LowRankFactor, d, k, oversampling=p)
    biggest = max(t.numel() for t in vars(factor).values() if isinstance(t, torch.Tensor))
    assert biggest == d * (k + p)
    assert sum(t.numel() for t in vars(factor).values() if isinstance(t, torch.Tensor)) < 4 * d * (k + p)
    assert DenseFactor(64, CPU, DT).matrix.numel() == 64 * 64


def test_first_fold_takes_the_batch_and_invalid_folds_change_nothing():
    factor = DenseFactor(3, CPU, DT)
    rows = torch.randn(5, 3, dtype=DT)
    factor.accumulate(rows, 0.2)
    factor.fold(0.9, torch.tensor(True))
    torch.testing.assert_close(factor.matrix, rows.T @ rows * 0.2)
    before = factor.matrix.clone()
    factor.accumulate(torch.full((2, 3), math.nan, dtype=DT), 1.0)
    factor.fold(0.9, torch.tensor(True))
    torch.testing.assert_close(factor.matrix, before)
    factor.accumulate(rows, 0.2)
    factor.fold(0.9, torch.tensor(False))
    torch.testing.assert_close(factor.matrix, before)


def test_fold_groups_skips_only_the_group_with_non_finite_statistics():
    """Layers fold together; one layer's inf leaves its own A and B as they were, the others take the EMA step."""
    rows = [torch.randn(6, 4, dtype=DT) for _ in range(6)]
    groups = [[DenseFactor(4, CPU, DT), DiagonalFactor(4, CPU, DT)] for _ in range(3)]
    for group, (a_rows, b_rows) in zip(groups, zip(rows[::2], rows[1::2])):
        group[0].accumulate(a_rows, 0.5)
        group[1].accumulate(b_rows, 0.5)
    assert fold_groups(groups, 0.9).tolist() == [True, True, True]  # first fold: the batch itself
    before = [[t.clone() for factor in group for t in factor.state_tensors()] for group in groups]
    new_rows = [torch.randn(6, 4, dtype=DT) for _ in range(6)]
    new_rows[2][0, 1] = math.inf  # group 1's A
    for group, (a_rows, b_rows) in zip(groups, zip(new_rows[::2], new_rows[1::2])):
        group[0].accumulate(a_rows, 0.5)
        group[1].accumulate(b_rows, 0.5)
    taken = fold_groups(groups, 0.9, valid=torch.tensor(True), scale=2)  # a pending sum over 2 ranks
    assert taken.tolist() == [True, False, True]
    for index in (0, 2):
        a_rows, b_rows = new_rows[2 * index], new_rows[2 * index + 1]
        expected_a = 0.9 * rows[2 * index].T @ rows[2 * index] * 0.5 + 0.1 * a_rows.T @ a_rows * 0.5 / 2
        expected_b = 0.9 * (rows[2 * index + 1] ** 2).sum(0) * 0.5 + 0.1 * (b_rows**2).sum(0) * 0.5 / 2
        torch.testing.assert_close(groups[index][0].matrix, expected_a)
        torch.testing.assert_close(groups[index][1].diag, expected_b)
        torch.testing.assert_close(groups[index][1].trace, expected_b.sum())
    after = [t for factor in groups[1] for t in factor.state_tensors()]
    for old, new in zip(before[1], after):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    for group in groups:  # every pending sum is cleared
        assert all(factor.pending_count == 0 and not any(t.any() for t in factor.pending_tensors()) for factor in group)
    state = [t.clone() for t in groups[0][0].state_tensors()]
    for factor in groups[0]:
        factor.accumulate(rows[0], 0.5)
    assert fold_groups(groups[:1], 0.9, valid=torch.tensor(False)).tolist() == [False]  # AMP's skip: nothing
    assert all(torch.equal(new, old) for new, old in zip(groups[0][0].state_tensors(), state))


@pytest.mark.parametrize("kind", ["dense", "grouped-dense", "low-rank"])
@pytest.mark.parametrize("weight", [0.25, "tensor"])
def test_implicit_ones_column_equals_the_materialised_column(kind, weight):
    """accumulate(R, w, ones_column=True) leaves the same pending sums as accumulate([R 1], w)."""
    torch.manual_seed(0)
    weight = torch.tensor(0.25, dtype=torch.float64) if weight == "tensor" else weight
    shape = (3, 20, 5) if kind == "grouped-dense" else (20, 5)
    rows = torch.randn(*shape, dtype=torch.float64)
    augmented = torch.cat([rows, torch.ones(*shape[:-1], 1, dtype=torch.float64)], -1)

    def factor():
        if kind == "low-rank":
            return LowRankFactor(6, 2, 2, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64)
        return DenseFactor(6, torch.device("cpu"), torch.float64, groups=3 if kind == "grouped-dense" else 1)

    implicit, explicit = factor(), factor()
    implicit.accumulate(rows, weight, ones_column=True)
    explicit.accumulate(augmented, weight)
    for got, expected in zip(implicit.pending_tensors(), explicit.pending_tensors()):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert any(float(t.abs().sum()) > 0 for t in implicit.pending_tensors())


@pytest.mark.parametrize(
    "kind, ones_column",  # B factors and the embedding's diagonal A have no ones column
    [("dense", False), ("dense", True), ("low-rank", False), ("low-rank", True), ("diag-plus-low-rank", False),
     ("diagonal", False)],
)  # fmt: skip
def test_statistics_taken_in_pieces_equal_one_pass(kind, ones_column, monkeypatch):
    """On a CPU large row blocks are accumulated a piece at a time (to stay in cache): the same sums and one estimate."""
    make = {
        "dense": lambda: DenseFactor(13, CPU, DT),
        "low-rank": lambda: new_factor(LowRankFactor, 13, 3),
        "diag-plus-low-rank": lambda: new_factor(DiagPlusLowRankFactor, 13, 3),
        "diagonal": lambda: DiagonalFactor(13, CPU, DT),
    }[kind]
    rows = torch.randn(50, 13 - int(ones_column), dtype=DT)
    whole, pieces = make(), make()
    whole.accumulate(rows, 0.3, ones_column=ones_column)
    monkeypatch.setattr("lightning_lrkfac.lowrank.CPU_CHUNK_ELEMENTS", 7 * rows.shape[1])  # 7-row pieces, 1 left
    pieces.accumulate(rows, 0.3, ones_column=ones_column)
    for got, expected in zip(pieces.pending_tensors(), whole.pending_tensors()):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert pieces.pending_count == whole.pending_count == 1
