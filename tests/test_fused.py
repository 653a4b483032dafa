"""The in-place natural gradient of low-rank layers (lightning_lrkfac/fused.py) against dense float64 inverses,
with B diagonal plus low rank and with B kept whole (a classifier head).

The reference forms A's and B's approximations as d×d matrices from the factors' kept eigenpairs,
inverts them with torch.linalg.inv, and applies N = B⁻¹ G A⁻¹ and the KL clip literally.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lrkfac import LowRankKFAC
from lightning_lrkfac.lowrank import DenseFactor, DiagPlusLowRankFactor, LowRankFactor

DT = torch.float64


def dense_inverses(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A + δ_A)⁻¹ and (B + δ_B)⁻¹ of the layer's approximations, formed and inverted densely."""
    a, b = layer.factors
    u, tail = a.eigenvectors, (a.tail if a.isotropic_tail else torch.zeros((), dtype=DT))
    eye_a = torch.eye(a.dim, dtype=DT)
    a_dense = u @ torch.diag(a.eigenvalues) @ u.T + tail * (eye_a - u @ u.T) + a.inverse_damping * eye_a
    if isinstance(b, DenseFactor):  # kept whole: the EMA matrix itself
        b_dense = b.matrix + b.inverse_damping * torch.eye(b.dim, dtype=DT)
    else:
        v = b.eigenvectors
        b_dense = (
            torch.diag(b.diag) + v @ torch.diag(b.eigenvalues) @ v.T + b.inverse_damping * torch.eye(b.dim, dtype=DT)
        )
    return torch.linalg.inv(a_dense), torch.linalg.inv(b_dense)


def model_and_batch(bias: bool):
    torch.manual_seed(0)
    linears = [
        nn.Linear(30, 24, bias=bias),
        nn.Tanh(),
        nn.Linear(24, 20, bias=bias),
        nn.Tanh(),
        nn.Linear(20, 4, bias=bias),
    ]
    return nn.Sequential(*linears).to(DT), torch.randn(64, 30, dtype=DT), torch.randint(0, 4, (64,))


@pytest.mark.parametrize("bias_rate", [None, 0.1, 0.3], ids=["no-bias", "bias-same-rate", "bias-own-rate"])
@pytest.mark.parametrize("isotropic_tail", [False, True])
@pytest.mark.parametrize("kl_clip", [None, 1e-6])
def test_fused_step_equals_dense_inverses_and_the_literal_kl_clip(bias_rate, isotropic_tail, kl_clip, monkeypatch):
    monkeypatch.setattr("lightning_lrkfac.fused.MIN_ELEMENTS", 1)  # small layers, so that the test is quick
    bias = bias_rate is not None
    model, x, y = model_and_batch(bias)
    rates = {id(p): (bias_rate if p.dim() == 1 else 0.1) for p in model.parameters()}
    groups = [{"params": [p for p in model.parameters() if p.dim() == 2], "lr": 0.1}]
    if bias:  # the KL clip sums one ⟨N, G⟩ per layer at the same rate, the weight's and bias's apart at their own
        groups.append({"params": [p for p in model.parameters() if p.dim() == 1], "lr": bias_rate})
    optimizer = torch.optim.SGD(groups)
    options = {"rank": 5, "dense_threshold": 0, "isotropic_tail": isotropic_tail, "kl_clip": kl_clip, "damping": 1e-2}
    with LowRankKFAC(model, basis_update_interval=1, **options) as kfac:
        for _ in range(3):  # the last step preconditions with bases refreshed three times
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            plain = {id(p): p.grad.clone() for p in model.parameters()}
            kfac.step(lr=optimizer)
    b_kinds = [type(layer.b_factor) for layer in kfac.layers]
    assert b_kinds == [DiagPlusLowRankFactor, DiagPlusLowRankFactor, DenseFactor]  # the head's 4 outputs: B whole
    for layer, rule in zip(kfac.layers, kfac.rules):  # the fused path applies to these layers
        assert isinstance(layer.a_factor, LowRankFactor) and rule.fused_step() is not None
        if isinstance(layer.b_factor, DiagPlusLowRankFactor):
            assert int(layer.b_factor.repairs) == 0  # so the dense reference is the operator itself
    naturals, budget = {}, 0.0
    for layer in kfac.layers:
        a_inverse, b_inverse = dense_inverses(layer)
        module = layer.module
        g = plain[id(module.weight)]
        if bias:
            g = torch.cat([g, plain[id(module.bias)][:, None]], dim=1)
        n = b_inverse @ g @ a_inverse
        naturals[id(module.weight)] = n[:, : module.in_features]
        budget += rates[id(module.weight)] ** 2 * float((n[:, : module.in_features] * g[:, : module.in_features]).sum())
        if bias:
            naturals[id(module.bias)] = n[:, -1]
            budget += rates[id(module.bias)] ** 2 * float((n[:, -1] * g[:, -1]).sum())
    scale = 1.0 if kl_clip is None else min(1.0, (kl_clip / budget) ** 0.5)
    if kl_clip is not None:
        assert scale < 0.5  # the clip is active
    for parameter in model.parameters():
        torch.testing.assert_close(parameter.grad, scale * naturals[id(parameter)], rtol=1e-9, atol=1e-12)


def test_small_gradients_take_the_general_path():
    """Below fused.MIN_ELEMENTS the general path's fewer kernels are cheaper; above it the step is written in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 384), nn.Tanh(), nn.Linear(384, 24))
    x, y = torch.randn(32, 400), torch.randint(0, 24, (32,))
    with LowRankKFAC(model, rank=8) as kfac:
        F.cross_entropy(model(x), y).backward()
        kfac.step(lr=0.1)
        assert [rule.fused_step() is not None for rule in kfac.rules] == [True, False]
