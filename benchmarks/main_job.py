"""The README's main job and its Adam twin, as a fresh clone runs them: steps and training time to 95% validation
accuracy, and the test accuracy then.

Each config runs ``repeats`` times, the two alternating, through the ``lrkfac`` command (LightningCLI), in a
temporary folder so that no logs are left behind.

    python -m benchmarks.main_job
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import tempfile
from pathlib import Path

from lightning_lrkfac.cli import main as lrkfac

from .common import print_table, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"callback": "configs/mnist1d_cnn_large_batch.yaml", "Adam twin": "configs/mnist1d_cnn_large_batch_adam.yaml"}


def run(config: str) -> dict[str, float]:
    """One ``lrkfac fit --config …``: the summary's test accuracy and fit wall time."""
    printed = io.StringIO()
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(printed):
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            lrkfac(["fit", "--config", str(ROOT / config), "--trainer.enable_progress_bar=false"])
        finally:
            os.chdir(cwd)
    text = printed.getvalue()
    return {
        "test_accuracy": float(re.search(r"test accuracy: ([\d.]+)", text).group(1)),
        "steps": int(re.search(r"optimizer steps: (\d+)", text).group(1)),
        "training_seconds": float(re.search(r"training wall time: ([\d.]+) s", text).group(1)),
        "fit_seconds": float(re.search(r"\(fit: ([\d.]+) s\)", text).group(1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, config in CONFIGS.items():
            runs[name].append(run(config))
    rows = [
        {
            "arm": name,
            "config": CONFIGS[name],
            "median_test_accuracy": statistics.median(r["test_accuracy"] for r in results),
            "min_test_accuracy": min(r["test_accuracy"] for r in results),
            "max_test_accuracy": max(r["test_accuracy"] for r in results),
            "median_steps": statistics.median(r["steps"] for r in results),
            "median_training_seconds": statistics.median(r["training_seconds"] for r in results),
            "median_fit_seconds": statistics.median(r["fit_seconds"] for r in results),
        }
        for name, results in runs.items()
    ]
    print_table(rows, list(rows[0]))
    write_json("main_job", {"repeats": args.repeats, "runs": runs}, rows)


if __name__ == "__main__":
    main()
