"""The callback in one step (against an independent dense K-FAC) and in a real Trainer run."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFACCallback

from .conftest import mlp
from .helpers import (
    DigitsModule,
    GradRecorder,
    damped_natural,
    digits_loader,
    digits_tensors,
    kfac_grads,
    quiet_trainer,
    with_ones,
)


def dense_kfac_augmented(model: nn.Sequential, x, y, damping):
    """Independent dense K-FAC with the bias as a column of ones in A (one block per layer)."""
    inputs, grads = {}, {}
    linears = [m for m in model if isinstance(m, nn.Linear)]

    def record(module, args, output):
        inputs[module] = args[0]
        output.register_hook(lambda grad: grads.__setitem__(module, grad))

    hooks = [m.register_forward_hook(record) for m in linears]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    n = x.shape[0]
    out = []
    for m in linears:
        a = with_ones(inputs[m])
        g = grads[m] * n
        A, B = a.T @ a / n, g.T @ g / n
        P = damped_natural(A, B, torch.cat([m.weight.grad, m.bias.grad[:, None]], 1), damping)
        out += [P[:, :-1], P[:, -1]]
    return out


def test_exact_mode_augmented_bias_matches_dense_reference():
    torch.set_default_dtype(torch.float64)
    try:
        model, x, y = mlp([6, 8, 4]), torch.randn(10, 6), torch.randint(0, 4, (10,))
        expected = dense_kfac_augmented(model, x, y, 1e-2)
        got, _ = kfac_grads(model, x, y, rank=16, damping=1e-2, kl_clip=None)
    finally:
        torch.set_default_dtype(torch.float32)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_low_rank_direction_approaches_exact_kfac_as_rank_grows():
    torch.manual_seed(0)
    x, y = digits_tensors(limit=512)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 96), nn.Tanh(), nn.Linear(96, 10))
    flat = lambda grads: torch.cat([g.flatten() for g in grads])  # noqa: E731
    exact = flat(kfac_grads(model, x, y, rank=128, kl_clip=None)[0])
    cosines = []
    for rank in (2, 8, 32, 64):
        options = dict(rank=rank, oversampling=rank, dense_threshold=0, kl_clip=None, basis_update_interval=1)
        direction = flat(kfac_grads(model, x, y, refreshes=8, **options)[0])
        cosines.append(float(F.cosine_similarity(direction, exact, dim=0)))
    print("cosine to exact K-FAC for k = 2, 8, 32, 64:", cosines)
    assert all(b > a - 0.005 for a, b in zip(cosines, cosines[1:])), cosines
    assert cosines[-1] > cosines[0] + 0.05 and cosines[-1] > 0.95, cosines


def test_trainer_run_on_digits_lowers_training_loss():
    torch.manual_seed(0)
    model = DigitsModule()
    callback = LowRankKFACCallback(rank=16, log_stats=False)
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback], logger=pl.loggers.CSVLogger("/tmp/lrkfac_test_logs"))
    losses = []
    trainer.fit(model, digits_loader())
    losses.append(float(trainer.callback_metrics["train_loss"]))
    assert losses[0] < 0.5, losses  # the initial loss is ln 10 ≈ 2.3
    assert [layer.name for layer in callback.engine.layers] == ["body.0", "body.2", "head"]


def test_coverage_is_a_read_only_property_of_the_callback():
    callback = LowRankKFACCallback(rank=8, log_stats=False)
    with pytest.raises(RuntimeError, match="once the Trainer has set the callback up"):
        _ = callback.coverage
    quiet_trainer(max_steps=1, callbacks=[callback]).fit(DigitsModule(), digits_loader(limit=64))
    rows = {row["parameter"]: row for row in callback.coverage}
    assert rows["head.weight"]["preconditioned"] and not rows["norm.weight"]["preconditioned"]
    assert callback.coverage is callback.engine.coverage
    with pytest.raises(AttributeError):
        callback.coverage = []


def test_only_handled_layers_get_preconditioned_gradients():
    batches = digits_loader(limit=64)
    records = {}
    for name, callbacks in (
        ("plain", []),
        ("kfac", [LowRankKFACCallback(rank=8, exclude=["body.2"], log_stats=False)]),
    ):
        torch.manual_seed(0)
        recorder = GradRecorder()
        quiet_trainer(max_steps=1, callbacks=callbacks + [recorder]).fit(DigitsModule(), batches)
        records[name] = recorder.grads
    plain, kfac = records["plain"], records["kfac"]
    assert set(plain) == set(kfac)
    for name in plain:
        changed = not torch.allclose(plain[name], kfac[name])
        handled = name.startswith(("body.0.", "head."))
        assert changed == handled, name


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(damping=0.0), "damping"),
        (dict(damping=-1.0), "damping"),
        (dict(factor_decay=1.0), "factor_decay"),
        (dict(factor_decay=-0.1), "factor_decay"),
        (dict(fisher_type="exact"), "fisher_type"),
        (dict(bias_mode="both"), "bias_mode"),
        (dict(basis_update_interval=0), "basis_update_interval"),
        (dict(kl_clip=0.0), "kl_clip"),
        (dict(include="head"), "include"),
        (dict(loss_reduction="max"), "loss_reduction"),
        (dict(factor_dtype="float16"), "factor_dtype"),
        (dict(likelihood="poisson"), "likelihood"),
        (dict(mc_output_module=3), "mc_output_module"),
    ],
)
def test_bad_options_fail_at_construction_naming_the_option(kwargs, option):
    with pytest.raises(ValueError, match=f"`{option}` must be"):
        LowRankKFACCallback(**kwargs)


def test_nothing_to_precondition_fails_at_setup():
    class NoLayers(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return (self.scale * batch[0]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="found nothing to precondition"):
        quiet_trainer(max_steps=1, callbacks=[LowRankKFACCallback()]).fit(NoLayers(), digits_loader(limit=8))
    with pytest.raises(ValueError, match="found nothing to precondition"):
        quiet_trainer(max_steps=1, callbacks=[LowRankKFACCallback(include=["nope*"])]).fit(
            DigitsModule(), digits_loader(limit=8)
        )
