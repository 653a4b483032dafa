"""Failure behaviour: a non-finite step changes nothing, unsupported strategies fail at setup, checkpoints are
checked entry by entry, long runs do not grow, and nothing captured outlives its step."""

from __future__ import annotations

import copy
import gc
import math
import tracemalloc

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from lightning_lrkfac import LowRankKFAC, LowRankKFACCallback, compat
from lightning_lrkfac.trainer_support import check_strategy

from .conftest import mlp
from .helpers import DigitsModule, digits_loader, quiet_trainer, same

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw-decay": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1),
}


class Snapshots(pl.Callback):
    """Parameters, optimizer state and curvature state at the start and end of every step."""

    def __init__(self, kfac: LowRankKFACCallback) -> None:
        self.kfac, self.start, self.end = kfac, [], []

    def _state(self, trainer, pl_module):
        optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
        curvature = [t.clone() for layer in self.kfac.engine.layers for f in layer.factors for t in f.state_tensors()]
        return {n: p.detach().clone() for n, p in pl_module.named_parameters()}, optimizer_state, curvature

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start.append(self._state(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end.append(self._state(trainer, pl_module))


class NaNInputAtStep(DigitsModule):
    """A batch with a NaN at one step: every gradient of that step is NaN."""

    def __init__(self, bad_step: int, optimizer: str) -> None:
        super().__init__()
        self.bad_step, self.optimizer_name = bad_step, optimizer

    def training_step(self, batch, batch_idx):
        x = batch[0].clone()
        if self.global_step == self.bad_step:
            x[0, 0] = math.nan
        return F.cross_entropy(self(x), batch[1])

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer_name](self.parameters())


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_nan_batch_changes_no_parameter_no_optimizer_state_and_no_curvature(optimizer):
    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, basis_update_interval=1, log_stats=False)
    snapshots = Snapshots(callback)
    model = NaNInputAtStep(bad_step=2, optimizer=optimizer)
    quiet_trainer(max_steps=5, callbacks=[callback, snapshots]).fit(model, digits_loader(limit=512))
    assert callback.engine.skipped_steps == 1 and callback.engine.steps == 5
    assert same(snapshots.start[2], snapshots.end[2]), "the NaN step changed something"
    assert not same(snapshots.start[3][0], snapshots.end[3][0]), "training went on after it"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(callback.engine.skipped_updates) == 0  # its statistics were dropped with the step, not folded


def test_without_the_guard_one_nan_batch_ruins_the_run():
    """The power of the test above: with skip_non_finite_steps=False every parameter becomes NaN."""
    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, log_stats=False, skip_non_finite_steps=False)
    model = NaNInputAtStep(bad_step=2, optimizer="sgd-momentum")
    quiet_trainer(max_steps=4, callbacks=[callback]).fit(model, digits_loader(limit=512))
    assert not torch.isfinite(model.head.weight).any()


class InfPlainGradAtStep(pl.Callback):
    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == 1:
            pl_module.norm.weight.grad[0] = math.inf  # a parameter the callback does not precondition


def test_a_non_finite_plain_gradient_also_skips_the_step():
    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, log_stats=False)
    snapshots = Snapshots(callback)
    model = DigitsModule()
    quiet_trainer(max_steps=3, callbacks=[callback, InfPlainGradAtStep(), snapshots]).fit(
        model, digits_loader(limit=256)
    )
    assert callback.engine.skipped_steps == 1
    assert same(snapshots.start[1], snapshots.end[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skipped_steps_are_logged(tmp_path):
    import csv

    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8)
    trainer = quiet_trainer(
        max_steps=4, callbacks=[callback], logger=pl.loggers.CSVLogger(tmp_path, name="run"), log_every_n_steps=1
    )
    trainer.fit(NaNInputAtStep(bad_step=1, optimizer="sgd-momentum"), digits_loader(limit=512))
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("lrkfac/skipped_steps")]
    assert [float(row["lrkfac/skipped_steps"]) for row in rows] == [0, 1, 1, 1]


def resolved_model_parallel(tensor_parallel: int) -> ModelParallelStrategy:
    """A ModelParallelStrategy as the callback sees it at setup (its sizes resolved)."""
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=tensor_parallel)
    assert compat.tensor_parallel_size(strategy) == tensor_parallel, "Lightning renamed _tensor_parallel_size"
    return strategy


class Subclassed(DDPStrategy):
    """Like DeepSpeedStrategy: a DDPStrategy subclass that shards or flattens parameters."""


@pytest.mark.parametrize(
    "strategy, supported",
    [
        (SingleDeviceStrategy(device=torch.device("cpu")), True),
        (DDPStrategy(), True),
        (DDPStrategy(start_method="spawn"), False),
        (DDPStrategy(start_method="fork"), False),
        (DDPStrategy(find_unused_parameters=True), False),
        (FSDPStrategy(), False),
        (Subclassed(), False),
        (resolved_model_parallel(1), True),
        (resolved_model_parallel(2), False),
        (ModelParallelStrategy(), False),  # "auto" tensor parallelism
    ],
    ids=["single", "ddp", "ddp_spawn", "ddp_fork", "find_unused", "fsdp", "ddp-subclass", "fsdp2", "tp2", "tp-auto"],
)
def test_unsupported_strategies_are_rejected_naming_the_strategy(strategy, supported):
    if supported:
        check_strategy(strategy)
        return
    with pytest.raises(RuntimeError, match=type(strategy).__name__ + r".*supports a single device"):
        check_strategy(strategy)


def test_unsupported_strategy_fails_at_setup_of_a_real_run():
    strategy = DDPStrategy(find_unused_parameters=True)
    trainer = quiet_trainer(max_steps=1, strategy=strategy, devices=1, callbacks=[LowRankKFACCallback()])
    with pytest.raises(RuntimeError, match=r"find_unused_parameters=True"):
        trainer.fit(DigitsModule(), digits_loader(limit=64))


@pytest.mark.parametrize("factor_dtype, expected", [(None, torch.float64), ("float32", torch.float32)])
def test_64_true_precision_gives_float64_factors_unless_set(factor_dtype, expected):
    torch.manual_seed(0)
    callback = LowRankKFACCallback(rank=8, factor_dtype=factor_dtype, log_stats=False)
    quiet_trainer(max_steps=2, precision="64-true", callbacks=[callback]).fit(DigitsModule(), digits_loader(limit=128))
    assert {f.dtype for layer in callback.engine.layers for f in layer.factors} == {expected}


def trained_engine(steps: int = 3) -> tuple[nn.Module, LowRankKFAC]:
    torch.manual_seed(0)
    model, x, y = mlp([6, 9, 4]), torch.randn(16, 6), torch.randint(0, 4, (16,))
    kfac = LowRankKFAC(model, rank=4, dense_threshold=0, basis_update_interval=2)
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kfac.step(lr=0.1)
    return model, kfac


def corrupt(state: dict, how: str) -> tuple[dict, str]:
    state = copy.deepcopy(state)
    tensors = state["layers"]["0"]["B"]["tensors"]
    if how == "missing-key":
        del state["steps"]
        return state, "steps"
    if how == "missing-tensor":
        del tensors["sketch"]
        return state, "layers.0.B.tensors.sketch"
    if how == "wrong-shape":
        tensors["diag"] = tensors["diag"][:-1]
        return state, "layers.0.B.tensors.diag"
    tensors["diag"] = tensors["diag"].double()
    return state, "layers.0.B.tensors.diag"


@pytest.mark.parametrize("how", ["missing-key", "missing-tensor", "wrong-shape", "wrong-dtype"])
def test_a_corrupt_checkpoint_fails_naming_the_entry_and_loads_nothing(how):
    _, source = trained_engine(steps=3)
    _, target = trained_engine(steps=1)
    before = copy.deepcopy(target.state_dict())
    state, key = corrupt(source.state_dict(), how)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        target.load_state_dict(state)
    assert same(target.state_dict(), before), "a failed load changed the state"
    target.load_state_dict(source.state_dict())  # the intact state loads
    assert same(target.state_dict(), source.state_dict())


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_long_run_does_not_grow_and_nothing_captured_outlives_its_step():
    """2,000 steps with factor updates every 3rd step, validation forwards and aborted steps in between."""
    torch.manual_seed(0)
    model, x, y = mlp([8, 16, 16, 4]), torch.randn(32, 8), torch.randint(0, 4, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kfac = LowRankKFAC(model, rank=4, dense_threshold=0, factor_update_interval=3, basis_update_interval=7)
    captured = kfac.capture
    counts, memory = {}, {}
    tracemalloc.start()
    try:
        for step in range(2000):
            if step % 50 == 0:  # validation inside training: eval mode, no grad
                model.eval()
                with torch.no_grad():
                    model(x)
                model.train()
            if step % 100 == 1:  # a step aborted by an exception after its forward
                try:
                    model(x + 1.0)
                    raise RuntimeError("aborted")
                except RuntimeError:
                    pass
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            kfac.step(lr=optimizer)
            optimizer.step()
            assert not any(captured.inputs[m] or captured.output_grads[m] for m in captured.modules), step
            if step in (500, 1999):
                counts[step], memory[step] = live_tensors(), tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        kfac.close()
    assert counts[1999] == counts[500], counts
    assert memory[1999] - memory[500] < 256 * 1024, memory
    assert kfac.skipped_steps == 0 and int(kfac.skipped_updates) == 0


def test_an_aborted_forward_leaves_no_statistics():
    """Exact mode: a forward without backward before the real one does not change the folded factors."""
    torch.manual_seed(0)
    model, x, y = mlp([4, 5, 3]).double(), torch.randn(8, 4).double(), torch.randint(0, 3, (8,))
    factors = []
    for abort in (False, True):
        with LowRankKFAC(model, rank=8, kl_clip=None) as kfac:
            if abort:
                model(x * 3.0)  # never reaches backward
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            kfac.step()
        factors.append([f.matrix.clone() for layer in kfac.layers for f in layer.factors])
    for clean, aborted in zip(*factors):
        assert torch.equal(clean, aborted)


def test_eigh_that_lapack_cannot_converge_falls_back_to_a_rescaled_float64_solve(monkeypatch):
    """A LinAlgError inside a refresh must not end the run: the rescaled retry gives the same eigenpairs."""
    from lightning_lrkfac import linalg

    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(7, 7, generator=generator)
    matrix = matrix @ matrix.T * 1e30
    real, calls = torch.linalg.eigh, []

    def failing_once(tensor):
        calls.append(tensor.dtype)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(tensor)

    monkeypatch.setattr(torch.linalg, "eigh", failing_once)
    values, vectors = linalg.safe_eigh(matrix)
    assert calls == [torch.float32, torch.float64]
    reference = real(matrix.double())[0]
    torch.testing.assert_close(values.double(), reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, matrix, rtol=1e-4, atol=1e-4 * 1e30 * 7)
