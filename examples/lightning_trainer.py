"""Low-rank K-FAC in a Lightning script: add the callback to an ordinary Trainer.

python examples/lightning_trainer.py [--max-epochs 10]
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import DigitsDataModule
from lightning_lrkfac.examples.models import MLPClassifier


def main(max_epochs: int = 10, fast_dev_run: bool = False) -> float:
    pl.seed_everything(0)
    model = MLPClassifier(in_features=64, hidden=(256, 256), lr=0.1)
    data = DigitsDataModule(batch_size=64)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=[LowRankKFACCallback(rank=16, damping=1e-2, isotropic_tail=True)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        fast_dev_run=fast_dev_run,
    )
    trainer.fit(model, datamodule=data)
    accuracy = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--fast-dev-run", action="store_true")
    options = parser.parse_args()
    main(options.max_epochs, options.fast_dev_run)
