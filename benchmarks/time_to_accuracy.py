"""Steps and wall time to a test-accuracy target: SGD+momentum, Adam, and SGD+momentum with the callback;
on the wide task (an MLP of width 1024) also asdl's dense K-FAC with the same SGD+momentum.

Each method gets a small grid (learning rate; damping for the curvature methods) and 3 seeds; the
best grid point by median steps-to-target is reported (AlgoPerf style; the curvature grids have
the extra damping axis). Every run trains to its last epoch; wall time counts training
steps only, not the accuracy checks. Seeds are the outer loop and the methods alternate
inside it, so that machine drift hits every arm alike.

    python -m benchmarks.time_to_accuracy [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from dataclasses import dataclass

import torch

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.models import MLPClassifier

from .common import RESULTS, device_record, print_table, pyplot, write_json
from .dense_kfac import AsdlKFACClassifier
from .training import BATCH, TargetTracker, data_module, label, quiet_trainer, tensors


@dataclass(frozen=True)
class Task:
    name: str
    in_features: int
    target: float
    max_epochs: int
    every: int
    hidden: tuple[int, ...] = (256, 256)
    dense_baseline: bool = False  # also run asdl's dense K-FAC

    def data(self, seed: int):
        return data_module(self.name, BATCH[self.name], seed)


TASKS = [
    Task("digits", 64, 0.95, 15, 5),
    Task("mnist1d", 40, 0.60, 25, 10),
    Task("mnist1d", 40, 0.60, 12, 10, hidden=(1024, 1024), dense_baseline=True),
]


def task_label(task: Task) -> str:
    return task.name if task.hidden == (256, 256) else f"{task.name}-w{task.hidden[0]}"


def grids(quick: bool, task: Task) -> dict[str, list[dict]]:
    lrs = [0.03, 0.1, 0.3] if not quick else [0.05, 0.1, 0.2]
    adam = [1e-3, 3e-3, 1e-2] if not quick else [1e-3, 3e-3]
    dampings = [1e-3, 1e-2, 1e-1] if not quick else [1e-2, 1e-1]
    curvature = [{"lr": lr, "damping": d} for lr, d in itertools.product(lrs, dampings)]
    methods = {"sgd": [{"lr": lr} for lr in lrs], "adam": [{"lr": lr} for lr in adam], "kfac": curvature}
    if task.dense_baseline:
        methods["asdl"] = curvature
    return methods


def one_run(task: Task, method: str, config: dict, seed: int, device: torch.device) -> dict:
    data = task.data(seed)
    test_x, test_y = tensors(data.test_set)
    torch.manual_seed(seed)
    common = dict(in_features=task.in_features, hidden=task.hidden, lr=config["lr"])
    if method == "asdl":  # the callback's intervals: curvature every step, inverses every 10
        model = AsdlKFACClassifier(damping=config["damping"], batch_size=BATCH[task.name], **common)
    else:
        model = MLPClassifier(optimizer="adam" if method == "adam" else "sgd", **common)
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
        name = task_label(task)
        methods = grids(args.quick, task)
        results: dict[tuple[str, str], list[dict]] = {}
        for seed in range(args.seeds):  # seeds outside, methods alternating inside
            for method, grid in methods.items():
                for config in grid:
                    run = one_run(task, method, config, seed, device)
                    results.setdefault((method, label(config)), []).append(run)
                    runs.append({"task": name, "method": method, **config, "seed": seed, **run})
        for method, grid in methods.items():
            best = None
            for config in grid:
                outcomes = results[(method, label(config))]
                summary = {
                    "task": name,
                    "target": task.target,
                    "method": method,
                    "config": label(config),
                    "reached": sum(math.isfinite(r["steps"]) for r in outcomes),
                    "median_steps": statistics.median(r["steps"] for r in outcomes),
                    "median_seconds": statistics.median(r["seconds"] for r in outcomes),
                    "best_accuracy": max(r["best_accuracy"] for r in outcomes),
                    "median_final_accuracy": statistics.median(r["final_accuracy"] for r in outcomes),
                    "ms_per_step": 1e3 * statistics.median(r["seconds_per_step"] for r in outcomes),
                }
                if best is None or (summary["median_steps"], summary["median_seconds"]) < (
                    best["median_steps"],
                    best["median_seconds"],
                ):
                    best, best_curves = summary, [r["history"] for r in outcomes]
            curves[(name, method)] = best_curves
            rows.append(best)
            print_table([best], list(best))
    for task in TASKS:
        sel = {r["method"]: r for r in rows if r["task"] == task_label(task)}
        baseline_time = min(sel["sgd"]["median_seconds"], sel["adam"]["median_seconds"])
        sel["kfac"]["steps_vs_sgd"] = sel["kfac"]["median_steps"] / sel["sgd"]["median_steps"]
        sel["kfac"]["time_vs_best_baseline"] = sel["kfac"]["median_seconds"] / baseline_time
        if "asdl" in sel:
            sel["kfac"]["time_vs_dense_kfac"] = sel["kfac"]["median_seconds"] / sel["asdl"]["median_seconds"]
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
            dense = (
                f", time / dense K-FAC (asdl) = {row['time_vs_dense_kfac']:.2f}" if "time_vs_dense_kfac" in row else ""
            )
            print(
                f"{row['task']}: callback steps / SGD steps = {row['steps_vs_sgd']:.2f}, "
                f"time / better of SGD and Adam = {row['time_vs_best_baseline']:.2f}{dense}"
            )
    runs = [{k: v for k, v in r.items() if k != "history"} for r in runs]
    write_json("time_to_accuracy", {**device_record(device), "seeds": args.seeds, "runs": runs}, rows)
    plt = pyplot()
    if plt is not None:
        figure, axes = plt.subplots(2, len(TASKS), figsize=(5 * len(TASKS), 7))
        for column, task in enumerate(TASKS):
            for method in grids(args.quick, task):
                for seed, history in enumerate(curves[(task_label(task), method)]):
                    steps, seconds, accuracy = zip(*history)
                    name = method if seed == 0 else None
                    color = {"sgd": "C0", "adam": "C1", "kfac": "C2", "asdl": "C3"}[method]
                    axes[0, column].plot(steps, accuracy, color=color, alpha=0.7, label=name)
                    axes[1, column].plot(seconds, accuracy, color=color, alpha=0.7, label=name)
            for row, xlabel in enumerate(("optimizer steps", "training seconds (wall)")):
                ax = axes[row, column]
                ax.axhline(task.target, color="k", ls="--", lw=0.8)
                ax.set(xlabel=xlabel, ylabel="test accuracy", title=f"{task_label(task)}, best grid point, 3 seeds")
                ax.set_ylim(max(0.0, task.target - 0.4), 1.0)
                ax.legend()
        figure.tight_layout()
        figure.savefig(RESULTS / "time_to_accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
