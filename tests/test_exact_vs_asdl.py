"""Exact mode (rank ≥ d) of the engine must reproduce dense K-FAC from asdl (fisher_emp) to float tolerance."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from benchmarks.dense_kfac import import_asdl

from .conftest import mlp, small_cnn
from .helpers import kfac_grads, plain_grads


def asdl_preconditioned(model, x, y, damping):
    asdl = import_asdl()
    cfg = asdl.PreconditioningConfig(damping=damping, data_size=x.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = asdl.KfacGradientMaker(model, cfg, fisher_type="fisher_emp", loss_type="cross_entropy")
        out = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, out, y)
        model.zero_grad()
        gm.forward_and_backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("builder, shape", [(lambda: mlp([7, 9, 5, 3]), (13, 7)), (small_cnn, (6, 3, 6, 6))])
@pytest.mark.parametrize("damping", [1e-3, 1e-1])
def test_exact_mode_matches_asdl(builder, shape, damping):
    torch.set_default_dtype(torch.float64)
    try:
        model = builder()
        x = torch.randn(*shape)
        y = torch.randint(0, 3, (shape[0],))
        expected = asdl_preconditioned(model, x, y, damping)
        got, _ = kfac_grads(model, x, y, rank=64, damping=damping, bias_mode="separate", kl_clip=None)
        plain = plain_grads(model, x, y)
    finally:
        torch.set_default_dtype(torch.float32)
    for g, e, p in zip(got, expected, plain):
        assert not torch.allclose(e, p, atol=1e-6), "the reference must differ from the plain gradient"
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
