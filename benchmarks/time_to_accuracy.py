"""Steps and wall time to a test-accuracy target: SGD+momentum, Adam, and SGD+momentum with the callback.

Each method gets a small grid (learning rate; damping for the callback) and 3 seeds; the
best grid point by median steps-to-target is reported (AlgoPerf style; the callback's grid has
the extra damping axis). Every run trains to its last epoch; wall time counts training
steps only, not the accuracy checks.

    python -m benchmarks.time_to_accuracy [--quick]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
from dataclasses import dataclass

import torch

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import DigitsDataModule, MNIST1DDataModule
from lightning_lrkfac.examples.models import MLPClassifier

from .common import RESULTS, device_record, print_table, pyplot, write_json
from .training import TargetTracker, quiet_trainer, tensors


@dataclass(frozen=True)
class Task:
    name: str
    in_features: int
    target: float
    max_epochs: int
    every: int

    def data(self, seed: int):
        """The task's DataModule, set up once (mnist1d generation takes seconds); ``seed`` shuffles batches."""
        module = _data_module(self.name)
        module.seed = seed
        return module


@functools.cache
def _data_module(name: str):
    module = DigitsDataModule(64) if name == "digits" else MNIST1DDataModule(128)
    module.setup("fit")
    return module


TASKS = [Task("digits", 64, 0.95, 15, 5), Task("mnist1d", 40, 0.60, 25, 10)]


def grids(quick: bool) -> dict[str, list[dict]]:
    lrs = [0.03, 0.1, 0.3] if not quick else [0.05, 0.1, 0.2]
    adam = [1e-3, 3e-3, 1e-2] if not quick else [1e-3, 3e-3]
    dampings = [1e-3, 1e-2, 1e-1] if not quick else [1e-2, 1e-1]
    return {
        "sgd": [{"lr": lr} for lr in lrs],
        "adam": [{"lr": lr} for lr in adam],
        "kfac": [{"lr": lr, "damping": d} for lr, d in itertools.product(lrs, dampings)],
    }


def one_run(task: Task, method: str, config: dict, seed: int, device: torch.device) -> dict:
    data = task.data(seed)
    test_x, test_y = tensors(data.test_set)
    torch.manual_seed(seed)
    model = MLPClassifier(
        in_features=task.in_features,
        hidden=(256, 256),
        lr=config["lr"],
        optimizer="adam" if method == "adam" else "sgd",
    )
    tracker = TargetTracker(test_x, test_y, task.target, task.every)
    callbacks = [tracker]
    if method == "kfac":
        options = {"rank": 16, "isotropic_tail": True, **{k: v for k, v in config.items() if k != "lr"}}
        callbacks.append(LowRankKFACCallback(log_stats=False, seed=seed, **options))
    trainer = quiet_trainer(accelerator=device.type, max_epochs=task.max_epochs, callbacks=callbacks)
    trainer.fit(model, data)
    return {
        "steps": tracker.steps_to_target or math.inf,
        "seconds": tracker.seconds_to_target or math.inf,
        "best_accuracy": tracker.best,
        "final_accuracy": tracker.final,
        "seconds_per_step": statistics.median(tracker.seconds),
        "history": tracker.history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller grids")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows, runs, curves = [], [], {}
    for task in TASKS:
        for method, grid in grids(args.quick).items():
            best = None
            for config in grid:
                results = [one_run(task, method, config, seed, device) for seed in range(args.seeds)]
                runs += [{"task": task.name, "method": method, **config, "seed": s, **r} for s, r in enumerate(results)]
                summary = {
                    "task": task.name,
                    "target": task.target,
                    "method": method,
                    "config": ", ".join(f"{k}={v:g}" for k, v in config.items()),
                    "reached": sum(math.isfinite(r["steps"]) for r in results),
                    "median_steps": statistics.median(r["steps"] for r in results),
                    "median_seconds": statistics.median(r["seconds"] for r in results),
                    "best_accuracy": max(r["best_accuracy"] for r in results),
                    "median_final_accuracy": statistics.median(r["final_accuracy"] for r in results),
                    "ms_per_step": 1e3 * statistics.median(r["seconds_per_step"] for r in results),
                }
                if best is None or (summary["median_steps"], summary["median_seconds"]) < (
                    best["median_steps"],
                    best["median_seconds"],
                ):
                    best = summary
                    best_curves = [r["history"] for r in results]
            curves[(task.name, method)] = best_curves
            rows.append(best)
            print_table([best], list(best))
    for task in TASKS:
        sel = {r["method"]: r for r in rows if r["task"] == task.name}
        baseline_time = min(sel["sgd"]["median_seconds"], sel["adam"]["median_seconds"])
        sel["kfac"]["steps_vs_sgd"] = sel["kfac"]["median_steps"] / sel["sgd"]["median_steps"]
        sel["kfac"]["time_vs_best_baseline"] = sel["kfac"]["median_seconds"] / baseline_time
    print("\nbest grid point per method (median over seeds):")
    columns = [
        "task",
        "method",
        "config",
        "reached",
        "median_steps",
        "median_seconds",
        "best_accuracy",
        "median_final_accuracy",
        "ms_per_step",
    ]
    print_table(rows, columns)
    for row in rows:
        if "steps_vs_sgd" in row:
            print(
                f"{row['task']}: callback steps / SGD steps = {row['steps_vs_sgd']:.2f}, "
                f"time / better of SGD and Adam = {row['time_vs_best_baseline']:.2f}"
            )
    runs = [{k: v for k, v in r.items() if k != "history"} for r in runs]
    write_json("time_to_accuracy", {**device_record(device), "seeds": args.seeds, "runs": runs}, rows)
    plt = pyplot()
    if plt is not None:
        figure, axes = plt.subplots(2, len(TASKS), figsize=(5 * len(TASKS), 7))
        for column, task in enumerate(TASKS):
            for method in grids(args.quick):
                for seed, history in enumerate(curves[(task.name, method)]):
                    steps, seconds, accuracy = zip(*history)
                    label = method if seed == 0 else None
                    color = {"sgd": "C0", "adam": "C1", "kfac": "C2"}[method]
                    axes[0, column].plot(steps, accuracy, color=color, alpha=0.7, label=label)
                    axes[1, column].plot(seconds, accuracy, color=color, alpha=0.7, label=label)
            for row, xlabel in enumerate(("optimizer steps", "training seconds (wall)")):
                ax = axes[row, column]
                ax.axhline(task.target, color="k", ls="--", lw=0.8)
                ax.set(xlabel=xlabel, ylabel="test accuracy", title=f"{task.name}, best grid point, 3 seeds")
                ax.set_ylim(max(0.0, task.target - 0.4), 1.0)
                ax.legend()
        figure.tight_layout()
        figure.savefig(RESULTS / "time_to_accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
