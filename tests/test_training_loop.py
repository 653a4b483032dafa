"""Training-loop integration: accumulation, clipping order, resume, unsupported set-ups, non-finite statistics."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFACCallback

from .helpers import DigitsModule, GradRecorder, digits_loader, quiet_trainer


def test_gradient_accumulation_equals_one_big_batch_in_exact_mode():
    """Two micro-batches of 32 with accumulate_grad_batches=2 == one batch of 64 (exact mode)."""
    grads = {}
    for name, batch_size, accumulate in (("big", 64, 1), ("micro", 32, 2)):
        torch.manual_seed(0)
        recorder = GradRecorder()
        loader = torch.utils.data.DataLoader(digits_loader(limit=64).dataset, batch_size=batch_size, shuffle=False)
        callback = LowRankKFACCallback(rank=128, kl_clip=None, factor_dtype="float64", log_stats=False)
        quiet_trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[callback, recorder]).fit(
            DigitsModule(), loader
        )
        grads[name] = recorder.grads
    for key in grads["big"]:
        # float32 model gradients summed over two micro-batches: rounding only (a wrong B scale is ×4).
        torch.testing.assert_close(grads["micro"][key], grads["big"][key], rtol=1e-3, atol=2e-5)


def test_gradient_clipping_applies_to_the_preconditioned_gradient():
    """Lightning clips after on_before_optimizer_step: the step must use clip(P), not P(clip(G))."""

    class StepRecorder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    torch.manual_seed(0)
    model = DigitsModule(lr=1.0)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recorder, steps = GradRecorder(), StepRecorder()
    callback = LowRankKFACCallback(rank=8, kl_clip=None, log_stats=False)
    quiet_trainer(
        max_steps=1, gradient_clip_val=0.01, gradient_clip_algorithm="norm", callbacks=[callback, recorder, steps]
    ).fit(model, digits_loader(limit=64))
    preconditioned = recorder.grads  # seen after the callback, before clipping
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in preconditioned.values()]))
    assert total > 0.01
    for name, grad in preconditioned.items():
        step = before[name] - steps.after[name]
        torch.testing.assert_close(step, grad * (0.01 / (total + 1e-6)), rtol=1e-4, atol=1e-7)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    def fit(max_epochs, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        model = DigitsModule()
        callback = LowRankKFACCallback(rank=8, basis_update_interval=3, log_stats=False)
        trainer = quiet_trainer(
            max_epochs=max_epochs,
            callbacks=[callback, *callbacks],
            enable_checkpointing=True,
            default_root_dir=tmp_path,
        )
        # No shuffling: a resumed run restarts the loader's generator, an uninterrupted one does not.
        loader = torch.utils.data.DataLoader(digits_loader(limit=256).dataset, batch_size=64, shuffle=False)
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return trainer, model

    uninterrupted = fit(4)[1]
    first, _ = fit(2, callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    resumed = fit(4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))[1]
    for (name, a), (_, b) in zip(uninterrupted.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_with_other_shapes_or_options_fails_clearly():
    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, log_stats=False)
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(DigitsModule(), digits_loader(limit=128))
    state = callback.state_dict()
    assert state["steps"] == 2
    other = LowRankKFACCallback(rank=4, log_stats=False)
    other.load_state_dict(state)  # before fit: kept until the factors exist, then checked
    with pytest.raises(ValueError, match="options"):
        quiet_trainer(max_steps=1, callbacks=[other]).fit(DigitsModule(), digits_loader(limit=64))
    state["options"]["rank"] = 4
    state["layers"]["head"]["in_dim"] = 99
    with pytest.raises(ValueError, match="do not match the model"):
        other.load_state_dict(state)


def test_manual_optimization_fails_at_setup():
    class Manual(DigitsModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="automatic optimization"):
        quiet_trainer(max_steps=1, callbacks=[LowRankKFACCallback()]).fit(Manual(), digits_loader(limit=64))


def test_several_optimizers_fail_at_fit_start():
    class TwoOptimizers(DigitsModule):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.body.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]

    with pytest.raises(RuntimeError):
        quiet_trainer(max_steps=1, callbacks=[LowRankKFACCallback()]).fit(TwoOptimizers(), digits_loader(limit=64))


def test_non_finite_statistics_are_skipped_and_counted():
    class Poisoned(DigitsModule):
        def training_step(self, batch, batch_idx):
            x = batch[0].clone()
            if self.global_step == 1:
                x[0, 0] = math.inf
            return F.cross_entropy(self(x), batch[1])

    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, log_stats=False, skip_non_finite_steps=False)  # the statistics' own guard
    model = Poisoned()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)  # keep parameters finite
    quiet_trainer(max_steps=3, callbacks=[callback]).fit(model, digits_loader(limit=256))
    assert int(callback.engine.skipped_updates) >= 1
    for layer in callback.engine.layers:
        for factor in layer.factors:
            assert all(torch.isfinite(t).all() for t in factor.state_tensors())


def test_frozen_and_bias_free_layers():
    class Mixed(DigitsModule):
        def __init__(self):
            super().__init__()
            self.body[0].weight.requires_grad_(False)
            self.head = nn.Linear(64, 10, bias=False)

    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, log_stats=False)
    quiet_trainer(max_steps=3, callbacks=[callback]).fit(Mixed(), digits_loader(limit=256))
    assert [layer.name for layer in callback.engine.layers] == ["body.2", "head"]
    assert callback.engine.skipped_modules == {"body.0": "frozen weight"}


def test_bf16_mixed_keeps_float32_factors():
    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, log_stats=False)
    trainer = quiet_trainer(max_epochs=2, precision="bf16-mixed", callbacks=[callback])
    trainer.fit(DigitsModule(), digits_loader(limit=512))
    for layer in callback.engine.layers:
        for factor in layer.factors:
            assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in factor.state_tensors())
    assert int(callback.engine.skipped_updates) == 0
