"""Lightning runs for the benchmarks: a step timer and a test-accuracy target tracker."""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_lrkfac.examples.data import DigitsDataModule, MNIST1DDataModule


class StepTimer(pl.Callback):
    """Wall time of each training step (forward, backward, callback work, optimizer), CUDA-synchronised."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        self.seconds.append(time.perf_counter() - self._start)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> float:
    """Test accuracy of logits."""
    return float((outputs.argmax(-1).cpu() == targets).float().mean())


def negative_mse(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> float:
    """−(reconstruction MSE) of an autoencoder: a score where higher is better, like accuracy."""
    return -float((outputs.cpu() - inputs).square().mean())


class TargetTracker(StepTimer):
    """Every ``every`` steps and at the end, a test score (accuracy unless ``score`` says otherwise) on the whole
    test set (not timed).

    Records the optimizer steps and the training wall time (sum of step times) to first reach
    ``target``, the best score seen and the final one. The run goes on to its end.
    """

    def __init__(self, test_x: torch.Tensor, test_y: torch.Tensor, target: float, every: int, score=accuracy) -> None:
        super().__init__()
        self.test_x, self.test_y, self.target, self.every, self.score = test_x, test_y, target, every, score
        self.best = self.final = -math.inf
        self.steps_to_target: int | None = None
        self.seconds_to_target: float | None = None
        #: (optimizer step, training seconds so far, test accuracy) at every check.
        self.history: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step % self.every == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer, pl_module) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            outputs = pl_module(self.test_x.to(pl_module.device))
            score = self.score(outputs, self.test_y, self.test_x)
        pl_module.train(was_training)
        self.best, self.final = max(self.best, score), score
        self.history.append((trainer.global_step, sum(self.seconds), score))
        if score >= self.target and self.steps_to_target is None:
            self.steps_to_target = trainer.global_step
            self.seconds_to_target = sum(self.seconds)


class StopAtTarget(TargetTracker):
    """The target tracker, ending the run once the score reaches the target."""

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super()._evaluate(trainer, pl_module)
        if self.steps_to_target is not None:
            trainer.should_stop = True


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        devices=1,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def tensors(dataset: torch.utils.data.TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.tensors[0], dataset.tensors[1]


@functools.cache
def _set_up(name: str, batch_size: int):
    module = DigitsDataModule(batch_size) if name == "digits" else MNIST1DDataModule(batch_size)
    module.setup("fit")  # mnist1d generation takes seconds: once per process
    return module


#: The batch size of each dataset in the benchmarks.
BATCH = {"digits": 64, "mnist1d": 128}


def data_module(name: str, batch_size: int, seed: int):
    """The digits or mnist1d DataModule, set up once per process; ``seed`` shuffles the training batches."""
    module = _set_up(name, batch_size)
    module.seed = seed
    return module


def label(config: dict) -> str:
    """A grid point as text, e.g. ``lr=0.1, damping=0.01``."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())
