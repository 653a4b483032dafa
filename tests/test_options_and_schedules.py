"""Options declared once (callback signature, docs table, checkpoint signature) and step schedules."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_lrkfac import KFACOptions, LowRankKFAC, LowRankKFACCallback
from lightning_lrkfac.cli import LRKFACCLI
from lightning_lrkfac.options import markdown_table
from lightning_lrkfac.schedules import Constant, ExponentialDecay, LinearWarmup, StepMilestones

from .conftest import mlp

ROOT = Path(__file__).resolve().parents[1]


def test_callback_signature_is_the_options_declaration():
    """LightningCLI reads the callback's explicit keywords: names, order, defaults and types must be the options'."""
    parameters = list(inspect.signature(LowRankKFACCallback.__init__).parameters.values())[1:]
    declared, types = dataclasses.fields(KFACOptions), typing.get_type_hints(KFACOptions)
    assert [p.name for p in parameters] == [f.name for f in declared]
    for parameter, spec in zip(parameters, declared):
        assert parameter.default == spec.default, spec.name
        assert parameter.annotation == types[spec.name], spec.name
    assert LowRankKFACCallback().options == KFACOptions()


def test_docs_option_table_is_generated_from_the_declaration():
    assert markdown_table() in (ROOT / "docs/options.md").read_text(), (
        "paste lightning_lrkfac.options.markdown_table() into docs/options.md"
    )


def test_checkpoint_signature_holds_the_options_the_state_depends_on():
    assert set(KFACOptions().signature()) == {
        "rank", "oversampling", "step_rule", "bias_mode", "weight_sharing", "dense_threshold", "fisher_type",
        "factor_dtype",
    }  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(damping=lambda step: -1.0), "damping"),
        (dict(damping=StepMilestones(0.0, [3])), "damping"),
        (dict(factor_decay=Constant(1.0)), "factor_decay"),
        (dict(kl_clip=lambda step: 0.0), "kl_clip"),
        (dict(work_distribution="ring"), "work_distribution"),
        (dict(seed=1.5), "seed"),
        (dict(factor_dtype="bfloat16"), "factor_dtype"),
    ],
)
def test_bad_options_and_schedules_fail_naming_the_option(kwargs, option):
    with pytest.raises(ValueError, match=f"`{option}` must be"):
        KFACOptions(**kwargs)
    with pytest.raises(ValueError, match=f"`{option}` must be"):
        LowRankKFAC(mlp([3, 2]), **kwargs)


def test_schedule_classes():
    assert [ExponentialDecay(1.0, 0.5, every=2, minimum=0.2)(s) for s in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert ExponentialDecay(1.0, 0.5, minimum=0.2)(10) == 0.2
    assert [StepMilestones(1.0, [2, 4], 0.1)(s) for s in (0, 1, 2, 3, 4)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert [LinearWarmup(0.0, 1.0, 4)(s) for s in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert Constant(3.0)(7) == 3.0
    for bad in (lambda: ExponentialDecay(1.0, 0.0), lambda: StepMilestones(1.0, [-1]), lambda: LinearWarmup(0, 1, 0)):
        with pytest.raises(ValueError, match="schedule `"):
            bad()


def expected_damping_a(layer, damping: float) -> float:
    """δ_A = π √λ with π = sqrt((tr A / d_A) / (tr B / d_B)), from the factors' current traces."""
    a, b = layer.factors
    pi = ((float(a.trace) / a.dim) / (float(b.trace) / b.dim)) ** 0.5
    return pi * damping**0.5


def test_damping_schedule_changes_the_pi_damped_values_on_exactly_its_steps():
    """Refresh only at step 0; λ drops ×0.1 at step 3: δ_A stays between, changes at step 3 to π_3 √(λ/10)."""
    torch.manual_seed(0)
    model, x, y = mlp([5, 7, 3]), torch.randn(16, 5), torch.randint(0, 3, (16,))
    schedule = StepMilestones(1e-2, milestones=[3], factor=0.1)
    deltas = []
    with LowRankKFAC(model, rank=4, damping=schedule, basis_update_interval=100, kl_clip=None) as kfac:
        for step in range(6):
            model.zero_grad()
            F.cross_entropy(model(x + 0.1 * step), y).backward()
            kfac.step()
            deltas.append(float(kfac.layers[0].a_factor.inverse_damping))
            if step == 3:
                torch.testing.assert_close(deltas[-1], expected_damping_a(kfac.layers[0], 1e-3), rtol=1e-6, atol=0)
        assert kfac.metrics()["damping"] == pytest.approx(1e-3)
    changed = [step for step in range(1, 6) if deltas[step] != deltas[step - 1]]
    assert changed == [3], deltas


class DampingRecorder(pl.Callback):
    """δ_A of the first layer after each step, read after the K-FAC callback has stepped."""

    def __init__(self) -> None:
        self.deltas: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        kfac = next(c for c in trainer.callbacks if isinstance(c, LowRankKFACCallback))
        self.deltas.append(float(kfac.engine.layers[0].a_factor.inverse_damping))


def test_damping_schedule_from_a_lightningcli_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "scheduled.yaml"
    config.write_text(
        """
trainer:
  max_steps: 6
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_lrkfac.LowRankKFACCallback
      init_args:
        rank: 8
        basis_update_interval: 100
        damping:
          class_path: lightning_lrkfac.schedules.StepMilestones
          init_args: {initial: 0.01, milestones: [4], factor: 0.1}
"""
    )
    args = ["--config", str(ROOT / "configs/digits_mlp.yaml"), "--config", str(config)]
    cli = LRKFACCLI(subclass_mode_model=True, subclass_mode_data=True, args=args, run=False)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, LowRankKFACCallback))
    assert isinstance(callback.options.damping, StepMilestones) and callback.options.damping.milestones == [4]
    recorder = DampingRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    changed = [step for step in range(1, 6) if recorder.deltas[step] != recorder.deltas[step - 1]]
    assert changed == [4], recorder.deltas
