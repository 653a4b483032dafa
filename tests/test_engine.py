"""The framework-free engine: same steps as the callback, per-group KL clip, hooks' lifetime, imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFAC, LowRankKFACCallback

from .conftest import mlp
from .helpers import DigitsModule, GradRecorder, digits_tensors, kfac_grads, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]


def digits_batches(count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = digits_tensors(limit=count * size)
    return [(x[i : i + size].double(), y[i : i + size]) for i in range(0, count * size, size)]


def engine_run(batches, **options) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DigitsModule().double()
    optimizer = model.configure_optimizers()
    with LowRankKFAC(model, **options) as kfac:
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            kfac.step(lr=optimizer)
            optimizer.step()
    assert kfac.steps == len(batches)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def callback_run(batches, **options) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DigitsModule().double()
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    callback = LowRankKFACCallback(log_stats=False, **options)
    quiet_trainer(max_steps=len(batches), precision="64-true", callbacks=[callback]).fit(model, loader)
    assert callback.engine.steps == len(batches)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("rank, tolerance", [(128, 1e-12), (8, 1e-6)], ids=["exact", "low-rank"])
def test_engine_in_a_plain_loop_equals_the_callback_in_a_trainer(rank, tolerance):
    """6 steps in float64, EMA on, refresh every 2 steps, KL clip on: the same parameters."""
    batches = digits_batches(6, 32)
    options = dict(rank=rank, basis_update_interval=2, factor_decay=0.95, kl_clip=1e-3)
    engine, callback = engine_run(batches, **options), callback_run(batches, **options)
    torch.manual_seed(0)
    initial = dict(DigitsModule().double().named_parameters())
    for name, value in engine.items():
        assert callback[name].dtype == torch.float64
        torch.testing.assert_close(callback[name], value, rtol=0, atol=tolerance, msg=name)
        assert not torch.allclose(value, initial[name]), name  # the runs did move


def test_kl_clip_needs_a_learning_rate_and_none_needs_none():
    model, x, y = mlp([4, 6, 3]), torch.randn(8, 4), torch.randint(0, 3, (8,))
    with LowRankKFAC(model, rank=8) as kfac:
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(ValueError, match="`lr` must be given"):
            kfac.step()
        assert kfac.steps == 0  # nothing happened
    grads, kfac = kfac_grads(model, x, y, rank=8, kl_clip=None)
    assert kfac.steps == 1 and kfac.bases_ready()


def test_kl_clip_uses_each_parameter_groups_learning_rate():
    """ν = min(1, sqrt(κ / Σ_p η_p² ⟨P_p, G_p⟩)) with η_p the rate of p's group (weights 0.1 / 0.03, biases 0.5)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    base = mlp([5, 7, 3])

    def run(kl_clip):
        model = mlp([5, 7, 3])
        model.load_state_dict(base.state_dict())
        groups = [
            {"params": [model[0].weight], "lr": 0.1},
            {"params": [model[2].weight], "lr": 0.03},
            {"params": [model[0].bias, model[2].bias], "lr": 0.5},
        ]
        optimizer = torch.optim.SGD(groups, lr=0.1)
        with LowRankKFAC(model, rank=16, kl_clip=kl_clip) as kfac:
            F.cross_entropy(model(x), y).backward()
            plain = [p.grad.clone() for p in model.parameters()]
            kfac.step(lr=optimizer)
        rates = [0.1, 0.5, 0.03, 0.5]  # weight, bias, weight, bias in model.parameters() order
        return [p.grad.clone() for p in model.parameters()], plain, rates

    natural, plain, rates = run(None)
    budget = sum(r**2 * float((p * g).sum()) for r, p, g in zip(rates, natural, plain))
    kl_clip = budget / 9.0  # clipped: ν = 1/3
    clipped, _, _ = run(kl_clip)
    for got, direction in zip(clipped, natural):
        torch.testing.assert_close(got, direction / 3.0, rtol=1e-5, atol=1e-8)
    first_group_only = sum(0.1**2 * float((p * g).sum()) for p, g in zip(natural, plain))
    assert abs(first_group_only / budget - 1.0) > 0.2  # param_groups[0]'s rate alone would clip otherwise


def test_close_and_context_manager_remove_the_hooks():
    model = mlp([4, 6, 3])
    hooked = [m for m in model if isinstance(m, nn.Linear)]
    with LowRankKFAC(model, rank=8, kl_clip=None) as kfac:
        assert all(len(m._forward_hooks) == 1 for m in hooked)
        model(torch.randn(2, 4)).sum().backward()
        assert all(len(kfac.capture.inputs[m]) == 1 for m in hooked)
    assert all(len(m._forward_hooks) == 0 for m in hooked)
    assert not any(kfac.capture.inputs[m] for m in hooked)


def test_mc_fisher_without_before_backward_fails_clearly():
    model, x, y = mlp([4, 6, 3]), torch.randn(8, 4), torch.randint(0, 3, (8,))
    with LowRankKFAC(model, rank=8, fisher_type="mc", kl_clip=None) as kfac:
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(RuntimeError, match="before_backward"):
            kfac.step()


def test_factor_dtype_follows_the_weights_unless_set():
    model = mlp([4, 6, 3])
    assert LowRankKFAC(model, rank=8).layers and _dtypes(LowRankKFAC(model, rank=8)) == {torch.float32}
    assert _dtypes(LowRankKFAC(model.double(), rank=8)) == {torch.float64}
    assert _dtypes(LowRankKFAC(model.double(), rank=8, factor_dtype="float32")) == {torch.float32}


def _dtypes(kfac: LowRankKFAC) -> set[torch.dtype]:
    kfac.build()
    kfac.close()
    return {factor.dtype for layer in kfac.layers for factor in layer.factors}


def test_gradient_accumulation_through_record_equals_one_big_batch():
    """Two micro-batches recorded with accumulation=2 fold exactly the statistics of one batch of 16 (exact mode)."""
    torch.manual_seed(0)
    model, x, y = mlp([4, 6, 3]).double(), torch.randn(16, 4).double(), torch.randint(0, 3, (16,))
    factors = []
    for micro in (1, 2):
        with LowRankKFAC(model, rank=8, kl_clip=None) as kfac:
            model.zero_grad()
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                (F.cross_entropy(model(xs), ys) / micro).backward()
                kfac.record(accumulation=micro)
            kfac.step()
        factors.append([f.matrix.clone() for layer in kfac.layers for f in layer.factors])
    for big, accumulated in zip(*factors):
        torch.testing.assert_close(accumulated, big, rtol=1e-12, atol=1e-14)


def test_callback_grads_equal_engine_grads_in_one_trainer_step():
    """The adapter adds nothing: the gradient the optimizer sees equals the engine's on the same batch."""
    x, y = digits_tensors(limit=64)
    torch.manual_seed(0)
    model = DigitsModule(lr=0.1)  # kfac_grads clips with lr=0.1
    recorder = GradRecorder()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    quiet_trainer(max_steps=1, callbacks=[LowRankKFACCallback(rank=8, log_stats=False), recorder]).fit(model, loader)
    torch.manual_seed(0)
    engine_grads, _ = kfac_grads(DigitsModule(), x, y, rank=8)
    for (name, _), grad in zip(DigitsModule().named_parameters(), engine_grads):
        torch.testing.assert_close(recorder.grads[name], grad, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize(
    "code",
    [
        "import sys, lightning_lrkfac; assert 'sklearn' not in sys.modules, 'sklearn imported'",
        "import sys; from lightning_lrkfac import LowRankKFAC; assert 'pytorch_lightning' not in sys.modules",
        "import sys; from lightning_lrkfac import LowRankKFACCallback; assert 'sklearn' not in sys.modules",
    ],
    ids=["no-sklearn", "engine-without-lightning", "callback-without-sklearn"],
)
def test_imports_stay_apart(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_plain_pytorch_example_trains_without_lightning():
    code = (
        "import runpy, sys; module = runpy.run_path('examples/plain_pytorch.py'); "
        "accuracy = module['main'](epochs=3); "
        "assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules; "
        "assert accuracy > 0.9, accuracy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_convolutions_unfold_patches_only_on_factor_update_steps(monkeypatch):
    """factor_update_interval=3: conv statistics (patches or their sketch) are computed on steps 0 and 3 only,
    and nothing is captured in between."""
    from lightning_lrkfac.layers import ConvLayer

    calls = []
    original = ConvLayer._accumulate_inputs
    monkeypatch.setattr(
        ConvLayer,
        "_accumulate_inputs",
        lambda self, inputs, bases=None: calls.append(1) or original(self, inputs, bases),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16, 4))
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    with LowRankKFAC(model, rank=8, factor_update_interval=3, kl_clip=None) as kfac:
        for step in range(6):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            assert bool(kfac.capture.inputs[model[0]]) == (step % 3 == 0), step
            kfac.step()
    assert len(calls) == 2
