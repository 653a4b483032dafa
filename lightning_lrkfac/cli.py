"""`lrkfac`: the LightningCLI entry point. Models, data and the callback come from YAML."""

from __future__ import annotations

import time

from pytorch_lightning.callbacks import Timer
from pytorch_lightning.cli import LightningCLI

from .callback import LowRankKFACCallback


class LRKFACCLI(LightningCLI):
    """LightningCLI that, after ``fit``, tests the trained model and prints a short summary of the run.

    The summary: test accuracy (or test MSE for a regression model), the optimizer steps taken and the wall time of
    training (Lightning's ``Timer``: the fit loop without the data set-up) and of the whole ``fit``, the share of it
    the curvature work took (host time of the callback's record and step calls), and where the logs are.
    """

    def before_fit(self) -> None:
        self._timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if self._timer is None:
            self._timer = Timer(verbose=False)
            self.trainer.callbacks.append(self._timer)
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        seconds = time.perf_counter() - self._fit_started
        if self.trainer.fast_dev_run or self.datamodule is None or not hasattr(self.datamodule, "test_dataloader"):
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        lines = []
        if results and "test_acc" in results[0]:
            lines.append(f"test accuracy: {results[0]['test_acc']:.4f}")
        if results and "test_mse" in results[0]:
            lines.append(f"test MSE: {results[0]['test_mse']:.4f}")
        lines.append(f"optimizer steps: {self.trainer.global_step}")
        lines.append(f"training wall time: {self._timer.time_elapsed('train'):.1f} s (fit: {seconds:.1f} s)")
        kfac = next((c for c in self.trainer.callbacks if isinstance(c, LowRankKFACCallback)), None)
        if kfac is not None and kfac.engine is not None:
            share = kfac.engine.curvature_seconds / seconds
            lines.append(f"curvature work: {kfac.engine.curvature_seconds:.1f} s ({share:.0%} of the fit)")
        if self.trainer.loggers:
            directories = ", ".join(str(logger.log_dir) for logger in self.trainer.loggers if logger.log_dir)
            lines.append(f"logs: {directories} (plot both runs: python examples/plot_loss_curves.py --config ...)")
        print("\n".join(lines))


def main(args: list[str] | None = None) -> None:
    """Run ``lrkfac <subcommand> --config FILE``; any LightningModule / DataModule class path is accepted."""
    LRKFACCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
