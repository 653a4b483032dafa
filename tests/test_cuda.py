"""CUDA checks (skipped without a GPU): exact mode against the float64 reference, AMP, and no host sync per step."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lrkfac import LowRankKFAC, LowRankKFACCallback

from .helpers import DigitsModule, damped_natural, digits_loader, digits_tensors, kfac_grads, linear_io_grads, with_ones

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DAMPING = 1e-2


def test_exact_mode_on_cuda_matches_the_dense_float64_reference():
    """k ≥ d on CUDA in float64: (B + δ_B)⁻¹ G (A + δ_A)⁻¹ from dense solves on the CPU, to 1e-10."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)).double().cuda()
    x, y = torch.randn(16, 10, dtype=torch.float64, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
    linears = {"0": model[0], "2": model[2]}
    inputs, grads, params = linear_io_grads(linears, lambda: F.cross_entropy(model(x), y))
    expected = []
    for index, name in enumerate(linears):
        rows, outs = with_ones(inputs[name].detach()).cpu(), 16 * grads[name].cpu()
        gradient = torch.cat([params[2 * index], params[2 * index + 1][:, None]], 1).cpu()
        expected.append(damped_natural(rows.T @ rows / 16, outs.T @ outs / 16, gradient, DAMPING))
    got, kfac = kfac_grads(model, x, y, rank=64, damping=DAMPING, kl_clip=None)
    assert all(factor.device.type == "cuda" for layer in kfac.layers for factor in (layer.a_factor.matrix,))
    for index, reference in enumerate(expected):
        natural = torch.cat([got[2 * index], got[2 * index + 1][:, None]], 1).cpu()
        torch.testing.assert_close(natural, reference, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_training_on_cuda(precision, tmp_path):
    """A real GradScaler (16-mixed) or bf16 autocast: float32 factors, no skipped step, the digits learnt."""
    import pytorch_lightning as pl

    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=16, damping=1e-2)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_epochs=4, callbacks=[callback],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    module = DigitsModule(lr=0.05)
    trainer.fit(module, digits_loader())
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler is not None
    engine = callback.engine
    assert all(f.dtype == torch.float32 and f.device.type == "cuda" for layer in engine.layers for f in layer.factors)
    assert engine.skipped_steps == 0 and int(engine.skipped_updates) == 0
    x, y = digits_tensors()
    with torch.no_grad():
        accuracy = (module.cuda()(x.cuda()).argmax(-1).cpu() == y).float().mean()
    assert accuracy > 0.9


@pytest.mark.parametrize("step_rule", ["kfac", "ekfac", "soap"])
def test_no_host_sync_in_a_step_between_refreshes(step_rule):
    """torch.cuda.set_sync_debug_mode("error") around every step that refreshes no basis.

    ``skip_non_finite_steps`` is off: its one sync per step is its documented price. Refresh
    steps (eigh/SVD check their LAPACK info on the host) are counted, not forbidden.
    """
    torch.manual_seed(0)
    # width 512: the middle layer's gradient is large enough for the in-place step (fused.MIN_ELEMENTS)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).cuda()
    kl_clip = None if step_rule == "soap" else 1e-3
    kfac = LowRankKFAC(
        model, rank=16, basis_update_interval=5, skip_non_finite_steps=False, kl_clip=kl_clip, step_rule=step_rule
    )
    x, y = torch.randn(128, 64, device="cuda"), torch.randint(0, 10, (128,), device="cuda")
    refresh_syncs = 0
    for step in range(12):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step < 2:  # build and first refresh
            kfac.step(lr=0.1)
            continue
        refresh = step % 5 == 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn" if refresh else "error")
            try:
                kfac.step(lr=0.1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        refresh_syncs += len(caught) if refresh else 0
    torch.cuda.synchronize()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    in_place = [kfac.rules[i].fused_step() is not None for i in range(len(kfac.layers))]
    assert in_place == ([False, True, False] if step_rule == "kfac" else [False] * 3)
    print(f"{step_rule}: host syncs on 2 refresh steps: {refresh_syncs}")


def test_callback_under_single_gpu_fsdp2_matches_the_plain_engine_on_the_cpu(tmp_path):
    """Lightning's ModelParallelStrategy on one GPU (fully_shard on a 1-rank mesh): the sharded path on CUDA."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "fsdp_run.py"

    def run(name: str, *extra: str) -> dict:
        out = tmp_path / f"{name}.pt"
        command = [sys.executable, str(script), "--out", str(out), "--world", "1", "--mode", "exact", *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return torch.load(out, weights_only=False)

    gpu = run("gpu", "--driver", "lightning", "--accelerator", "cuda", "--port", "29650")
    cpu = run("cpu")
    assert gpu["sharded"] == ["0", "2.conv", "4"]
    for name, value in cpu["parameters"].items():
        torch.testing.assert_close(gpu["parameters"][name], value, rtol=1e-8, atol=1e-8, msg=name)


def test_a_model_compiled_with_cuda_graphs_is_refused_at_setup(tmp_path):
    """Trainer.fit(torch.compile(module, mode='reduce-overhead')) on a GPU fails at setup, before any step."""
    module = DigitsModule()
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_steps=2, callbacks=[LowRankKFACCallback()], default_root_dir=tmp_path,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="CUDA graphs"):
        trainer.fit(torch.compile(module, mode="reduce-overhead"), digits_loader())
    assert trainer.global_step == 0
