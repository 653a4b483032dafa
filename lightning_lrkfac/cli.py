"""`lrkfac`: the LightningCLI entry point. Models, data and the callback come from YAML."""

from __future__ import annotations

from pytorch_lightning.cli import LightningCLI


class LRKFACCLI(LightningCLI):
    """LightningCLI that, after ``fit``, evaluates the trained model on the test split and prints its accuracy."""

    def after_fit(self) -> None:
        if self.trainer.fast_dev_run or self.datamodule is None or not hasattr(self.datamodule, "test_dataloader"):
            return
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        if results and "test_acc" in results[0]:
            print(f"test accuracy: {results[0]['test_acc']:.4f}")


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
