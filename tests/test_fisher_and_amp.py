"""Monte-Carlo Fisher, layers used twice, 16-bit AMP with a loss scaler, and the logged metrics."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger

from lightning_lrkfac import LowRankKFAC, LowRankKFACCallback

from .helpers import DigitsModule, InfGradAtStep, damped_natural, digits_loader, fp16_plugin, kfac_grads, quiet_trainer


def true_fisher_b(model: nn.Sequential, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """E_x Jᵀ (diag p − ppᵀ) J for the output s of ``layer``, J = ∂logits/∂s (per example, by jacrev)."""
    index = list(model).index(layer)
    head, tail = model[: index + 1], model[index + 1 :]
    total = 0
    for example in x:
        s = head(example)
        jac = torch.func.jacrev(tail)(s)  # classes × out
        p = torch.softmax(tail(s), dim=-1)
        total = total + jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return total.detach() / x.shape[0]


def mc_b_factor(model: nn.Sequential, x, y, steps: int, **options) -> dict:
    """``steps`` engine steps with factor updates on the same batch (no parameter change: no optimizer)."""
    with LowRankKFAC(model, **options) as kfac:
        for _ in range(steps):
            model.zero_grad()
            loss = F.cross_entropy(model(x), y)
            kfac.before_backward()
            loss.backward()
            kfac.step()
    return {layer.module: layer.b_factor.matrix.clone() for layer in kfac.layers}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def test_mc_fisher_b_converges_to_the_true_fisher_and_the_empirical_one_does_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    with torch.no_grad():
        model[2].weight.mul_(4.0)  # confident predictions, so the empirical Fisher is far from the true one
    x, y = torch.randn(64, 5), torch.randint(0, 4, (64,))
    reference = {layer: true_fisher_b(model, layer, x) for layer in (model[0], model[2])}
    options = dict(rank=64, factor_decay=0.99, kl_clip=None, factor_dtype="float64")
    mc = mc_b_factor(model, x, y, steps=600, fisher_type="mc", **options)
    empirical = mc_b_factor(model, x, y, steps=2, **options)
    for layer, expected in reference.items():
        expected = expected.double()
        assert relative_error(mc[layer], expected) < 0.06, relative_error(mc[layer], expected)
        assert relative_error(empirical[layer], expected) > 0.3, relative_error(empirical[layer], expected)


def test_mc_fisher_gaussian_likelihood_b_is_identity_at_the_output():
    """For y ~ N(f, I), the sampled gradient is the noise: B of the output layer → I."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(128, 3), torch.zeros(128, dtype=torch.long)
    options = dict(fisher_type="mc", likelihood="gaussian", rank=64, factor_decay=0.98, kl_clip=None)
    b = mc_b_factor(model, x, y, steps=300, **options)[model[2]]
    torch.testing.assert_close(b, torch.eye(2), atol=0.05, rtol=0)


class ForwardCounter(pl.Callback):
    def __init__(self) -> None:
        self.forwards = 0

    def on_fit_start(self, trainer, pl_module):
        self.handle = pl_module.register_forward_hook(lambda *args: setattr(self, "forwards", self.forwards + 1))

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()


def test_mc_fisher_in_a_trainer_run_one_forward_per_step_and_lower_loss():
    torch.manual_seed(0)
    counter = ForwardCounter()
    callback = LowRankKFACCallback(rank=8, fisher_type="mc", mc_output_module="head")
    model = DigitsModule()
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback, counter])
    loader = digits_loader(limit=512)
    with torch.no_grad():
        before = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in loader) / 512
    trainer.fit(model, loader)
    with torch.no_grad():
        after = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in loader) / 512
    assert counter.forwards == trainer.global_step == 24
    assert after < 0.5 * before
    assert callback.engine.bases_ready() and int(callback.engine.skipped_updates) == 0


def test_mc_output_module_must_exist_and_be_reached():
    with pytest.raises(ValueError, match="`mc_output_module` must name a submodule"):
        quiet_trainer(max_steps=1, callbacks=[LowRankKFACCallback(fisher_type="mc", mc_output_module="nope")]).fit(
            DigitsModule(), digits_loader(limit=8)
        )
    with pytest.raises(RuntimeError, match=r"\['head'\] do not reach"):
        quiet_trainer(max_steps=1, callbacks=[LowRankKFACCallback(fisher_type="mc", mc_output_module="body.2")]).fit(
            DigitsModule(), digits_loader(limit=8)
        )


class TwiceUsed(nn.Module):
    """x → tanh(L1 x) → tanh(L2 ·) → tanh(L2 ·) → L3: L2 is applied twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l2(torch.tanh(self.l1(x)))))))


def test_layer_used_twice_gets_kfac_expand_statistics():
    """Exact mode: each use of L2 is one more row of A and B (K-FAC-expand over the two uses)."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model, x, y = TwiceUsed(), torch.randn(12, 4), torch.randint(0, 3, (12,))
        h1 = torch.tanh(model.l1(x))
        s1 = model.l2(h1)
        h2 = torch.tanh(s1)
        s2 = model.l2(h2)
        loss = F.cross_entropy(model.l3(torch.tanh(s2)), y)
        g1, g2, weight_grad, bias_grad = torch.autograd.grad(loss, [s1, s2, model.l2.weight, model.l2.bias])
        ones = torch.ones(12, 1)
        a = torch.cat([torch.cat([h1, ones], 1), torch.cat([h2, ones], 1)])
        g = torch.cat([g1, g2]) * 12  # per-example gradients of the mean loss
        A, B = a.T @ a / 24, g.T @ g / 24
        damping = 1e-2
        expected = damped_natural(A, B, torch.cat([weight_grad, bias_grad[:, None]], 1), damping)
        grads, _ = kfac_grads(model, x, y, rank=16, damping=damping, kl_clip=None, factor_dtype="float64")
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(grads[2], expected[:, :-1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[3], expected[:, -1], rtol=1e-10, atol=1e-12)


def test_16_mixed_unscales_statistics_and_keeps_float32_factors():
    """With a loss scale of 2¹⁶ the factors must match a float32 run (to fp16 rounding), not be 2³² larger."""
    factors = {}
    for name, plugins in (("fp32", []), ("fp16", [fp16_plugin()])):
        torch.manual_seed(0)
        callback = LowRankKFACCallback(rank=128, log_stats=False)
        trainer = quiet_trainer(max_steps=3, plugins=plugins, callbacks=[callback])
        trainer.fit(DigitsModule(), digits_loader(limit=192))
        factors[name] = [f.matrix for layer in callback.engine.layers for f in layer.factors]
    assert trainer.precision_plugin.scaler.get_scale() >= 2.0**15
    for fp16, fp32 in zip(factors["fp16"], factors["fp32"]):
        assert fp16.dtype == torch.float32
        assert relative_error(fp16, fp32) < 2e-2


class FactorSnapshots(pl.Callback):
    def __init__(self, callback: LowRankKFACCallback) -> None:
        self.callback, self.traces = callback, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.traces.append([f.trace.clone() for layer in self.callback.engine.layers for f in layer.factors])


def test_16_mixed_step_skipped_by_the_scaler_leaves_no_curvature_trace():
    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, log_stats=False)
    snapshots = FactorSnapshots(callback)
    trainer = quiet_trainer(max_steps=3, plugins=[fp16_plugin()], callbacks=[callback, InfGradAtStep(1), snapshots])
    trainer.fit(DigitsModule(), digits_loader(limit=256))
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**15  # the scaler saw the inf and backed off
    before, skipped, after = snapshots.traces
    assert all(torch.equal(s, b) for s, b in zip(skipped, before))
    assert not all(torch.equal(a, s) for a, s in zip(after, skipped))
    assert int(callback.engine.skipped_updates) == len(callback.engine.layers)
    assert callback.engine.skipped_steps == 0  # the scaler skipped that step: not counted twice


def test_logged_metrics_reach_the_logger(tmp_path):
    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, warmup_steps=2)
    trainer = quiet_trainer(
        max_steps=5, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1, callbacks=[callback]
    )
    trainer.fit(DigitsModule(), digits_loader(limit=512))
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("lrkfac/preconditioned")]
    assert len(rows) == 5
    assert [float(r["lrkfac/preconditioned"]) for r in rows] == [0, 0, 1, 1, 1]
    for row in rows:
        assert float(row["lrkfac/damping"]) == pytest.approx(1e-2)  # the default
        assert float(row["lrkfac/skipped_updates"]) == 0
        assert float(row["lrkfac/spd_repairs"]) >= 0
        assert float(row["lrkfac/curvature_ms"]) > 0
        for layer in ("body.0", "body.2", "head"):
            share_a = float(row[f"lrkfac/captured_trace/{layer}/A"])
            assert 0.0 < share_a <= 1.0 + 1e-6
            assert float(row[f"lrkfac/captured_trace/{layer}/B"]) >= 0.0
    assert float(rows[-1]["lrkfac/captured_trace/body.0/A"]) < 1.0


def test_metrics_are_logged_only_on_the_steps_the_logger_writes(tmp_path, monkeypatch):
    """``log`` is called on every third step with log_every_n_steps=3, and those rows reach the CSV."""
    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8)
    calls = []
    original = callback._log
    monkeypatch.setattr(
        callback, "_log", lambda module, *args: calls.append(module.trainer.global_step) or original(module, *args)
    )
    trainer = quiet_trainer(
        max_steps=9, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=3, callbacks=[callback]
    )
    trainer.fit(DigitsModule(), digits_loader(limit=512))
    assert calls == [2, 5, 8]
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("lrkfac/preconditioned")]
    assert steps == [2, 5, 8]
