"""Train SGD and SGD + low-rank K-FAC on the same config and plot both loss curves from the CSV logs.

    python examples/plot_loss_curves.py [--config configs/digits_mlp.yaml] [--out loss_curves.png]

Runs `lrkfac fit` on the config (with the callback) and on its `_sgd` twin, then reads each
run's metrics.csv and draws train loss per step and validation accuracy per epoch.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from lightning_lrkfac.cli import main as lrkfac


def run(config: Path, save_dir: str, name: str, max_epochs: int | None) -> Path:
    """One `lrkfac fit` with a single CSV logger; returns its metrics.csv."""
    args = ["fit", "--config", str(config), "--trainer.logger=pytorch_lightning.loggers.CSVLogger"]
    args += [f"--trainer.logger.init_args.save_dir={save_dir}", f"--trainer.logger.init_args.name={name}"]
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")
    lrkfac(args)
    return sorted(Path(save_dir, name).glob("version_*/metrics.csv"))[-1]


def read_series(path: Path, key: str, index: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    with open(path) as handle:
        for row in csv.DictReader(handle):
            if row.get(key):
                xs.append(float(row[index]))
                ys.append(float(row[key]))
    return xs, ys


def main(config: str, out: str, max_epochs: int | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit("This example needs matplotlib: pip install -e .[plot]") from error
    config_path = Path(config)
    baseline = config_path.with_name(config_path.stem + "_sgd.yaml")
    save_dir = tempfile.mkdtemp(prefix="lrkfac_curves_")
    runs = {
        "SGD": run(baseline, save_dir, "sgd", max_epochs),
        "SGD + low-rank K-FAC": run(config_path, save_dir, "kfac", max_epochs),
    }
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, metrics in runs.items():
        left.plot(*read_series(metrics, "train_loss_step", "step"), label=label)
        right.plot(*read_series(metrics, "val_acc", "epoch"), marker="o", label=label)
    left.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title=config_path.stem)
    right.set(xlabel="epoch", ylabel="validation accuracy")
    left.legend()
    right.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")
    return Path(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/digits_mlp.yaml")
    parser.add_argument("--out", default="loss_curves.png")
    parser.add_argument("--max-epochs", type=int, default=None)
    options = parser.parse_args()
    main(options.config, options.out, options.max_epochs)
