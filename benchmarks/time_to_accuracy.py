"""Steps and wall time to a test-accuracy target: SGD+momentum, Adam, and SGD+momentum with the callback;
on the wide task (an MLP of width 1024) also asdl's dense K-FAC with the same SGD+momentum.

Each method gets a small grid (learning rate; damping for the curvature methods). The harness's sweep
(:mod:`benchmarks.harness`): every grid point on seed 0, the methods alternating; then each method's best point
(most seeds reaching the target, fewest steps, least time) on seeds 1 and 2; medians of the three. Every run trains
to its last epoch; wall time counts training steps only, not the accuracy checks.

    python -m benchmarks.time_to_accuracy [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
from dataclasses import dataclass

import torch

from .common import RESULTS, device_record, plot_runs, print_table, pyplot, write_json
from .dense_kfac import AsdlKFACClassifier
from .harness import Method, Run, Sweep, sweep
from .step_rules import TASKS as STEP_RULE_TASKS
from .step_rules import Task
from .training import BATCH, TargetTracker, quiet_trainer, tensors


@dataclass(frozen=True)
class AccuracyTask:
    """A step-rules task trained for ``epochs``; the ``asdl`` method trains asdl's dense K-FAC in the same loop."""

    task: Task
    epochs: int
    dense_baseline: bool = False  # also run asdl's dense K-FAC

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def target(self) -> float:
        return self.task.target

    def run(self, method: Method, config: dict, seed: int, device: torch.device) -> Run:
        task = dataclasses.replace(self.task, max_epochs=self.epochs)
        if method.optimizer != "asdl":
            return task.run(method, config, seed, device)
        data = task.data(seed)
        test_x, test_y = tensors(data.test_set)
        torch.manual_seed(seed)
        model = AsdlKFACClassifier(  # the callback's intervals: curvature every step, inverses every 10
            in_features=task.in_features, hidden=task.hidden, lr=config["lr"], damping=config["damping"],
            batch_size=BATCH[task.data_name],
        )  # fmt: skip
        tracker = TargetTracker(test_x, test_y, task.target, task.every)
        quiet_trainer(accelerator=device.type, max_epochs=self.epochs, callbacks=[tracker]).fit(model, data)
        return Run(tracker.history, statistics.median(tracker.seconds))


def step_rule_task(name: str) -> Task:
    return next(task for task in STEP_RULE_TASKS if task.name == name)


TASKS = [
    AccuracyTask(step_rule_task("digits"), 15),
    AccuracyTask(step_rule_task("mnist1d"), 25),
    AccuracyTask(step_rule_task("mnist1d-w1024"), 12, dense_baseline=True),
]


def methods(quick: bool, task: AccuracyTask) -> list[Method]:
    lrs = [0.03, 0.1, 0.3] if not quick else [0.05, 0.1, 0.2]
    adam = [1e-3, 3e-3, 1e-2] if not quick else [1e-3, 3e-3]
    dampings = [1e-3, 1e-2, 1e-1] if not quick else [1e-2, 1e-1]
    curvature = tuple({"lr": lr, "damping": d} for lr, d in itertools.product(lrs, dampings))
    every = [
        Method("sgd", "sgd", 0.9, None, tuple({"lr": lr} for lr in lrs)),
        Method("adam", "adam", 0.0, None, tuple({"lr": lr} for lr in adam)),
        Method("kfac", "sgd", 0.9, {"rank": 16, "isotropic_tail": True}, curvature),
    ]
    return every + ([Method("asdl", "asdl", 0.9, None, curvature)] if task.dense_baseline else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller grids")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows, curves = [], {}
    for task in TASKS:
        every = methods(args.quick, task)
        result: Sweep = sweep([task], every, args.seeds, device, target=lambda t, _: t.target)
        for method in every:
            best = result.tuned(task.name, method, task.target)
            rows.append({**best, "target": task.target})
            curves[(task.name, method.name)] = [
                run.history for run in result.runs[(task.name, method.name, best["config"])]
            ]
    print("\nbest grid point per method (median over seeds):")
    print_table(rows, list(rows[0]))
    for task in TASKS:
        chosen = {row["method"]: row for row in rows if row["task"] == task.name}
        baseline = min(chosen["sgd"]["seconds"], chosen["adam"]["seconds"])
        dense = (
            f", time / dense K-FAC (asdl) {chosen['kfac']['seconds'] / chosen['asdl']['seconds']:.2f}"
            if "asdl" in chosen
            else ""
        )
        print(f"{task.name}: callback steps / SGD's {chosen['kfac']['steps'] / chosen['sgd']['steps']:.2f}, time / "
              f"better of SGD and Adam {chosen['kfac']['seconds'] / baseline:.2f}{dense}")  # fmt: skip
    write_json("time_to_accuracy", {**device_record(device), "seeds": args.seeds, "quick": args.quick}, rows)
    plot(curves, args.quick)


def plot(curves: dict, quick: bool) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(2, len(TASKS), figsize=(5 * len(TASKS), 7), squeeze=False)
    for column, task in enumerate(TASKS):
        plot_runs(axes, column, {m.name: curves[(task.name, m.name)] for m in methods(quick, task)})
        for row, xlabel in enumerate(("optimizer steps", "training seconds (wall)")):
            ax = axes[row, column]
            ax.axhline(task.target, color="k", ls="--", lw=0.8)
            ax.set(xlabel=xlabel, ylabel="test accuracy", title=f"{task.name}, best grid point")
            ax.set_ylim(max(0.0, task.target - 0.4), 1.0)
            ax.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "time_to_accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
