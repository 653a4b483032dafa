"""Which step to use: tuned and untuned SGD, Adam and the callback's three step rules, on three tasks.

Methods (each inside the same Lightning loop, MLPs at width 256):
- ``sgd``: SGD with momentum 0.9; ``adam``: Adam;
- ``kfac`` / ``ekfac``: SGD with momentum 0.9 and the callback (``step_rule`` kfac / ekfac), empirical
  Fisher; ``kfac-mc`` / ``ekfac-mc``: the same with the true Fisher (``fisher_type="mc"``: categorical
  likelihood for the classifiers, gaussian for the autoencoder);
- ``soap``: plain SGD (no momentum) and the callback with ``step_rule="soap"``, ``kl_clip=None``.

Tasks: digits and mnist1d classification (test accuracy) and a deep autoencoder on digits
(MSE regression, test reconstruction error); on request (``--tasks mnist1d-w1024``) also
time_to_accuracy's wide task, mnist1d with an MLP of width 1024. Every method has a grid and one default
configuration, fixed for all tasks (the AlgoPerf self-tuning view). The harness's sweep: every grid point on seed 0
with the methods alternating, then each method's best point (:func:`benchmarks.harness.best_point`) and its default
on seeds 1 and 2, seeds outside. Wall time counts training steps only, not the test evaluations.

    python -m benchmarks.step_rules [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
from dataclasses import dataclass

import torch

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.models import MLPAutoencoder, MLPClassifier

from .common import RESULTS, device_record, plot_runs, print_table, pyplot, write_json
from .harness import Method, Run, sweep
from .training import (
    BATCH,
    StopAtTarget,
    TargetTracker,
    accuracy,
    data_module,
    negative_mse,
    quiet_trainer,
    tensors,
)


@dataclass(frozen=True)
class Task:
    """A classifier or autoencoder on a small dataset; :meth:`run` is the harness's one run
    (:class:`benchmarks.harness.Task`). ``batch``, ``budget`` (steps) and ``stop_at_target`` override the defaults:
    the dataset's batch size, ``max_epochs``, and running to the end."""

    name: str
    data_name: str
    in_features: int
    target: float  # on the score: accuracy, or −MSE
    max_epochs: int
    every: int
    regression: bool = False
    hidden: tuple[int, ...] = (256, 256)
    batch: int | None = None
    budget: int = -1
    stop_at_target: bool = False

    def at(self, batch: int, budget: int, every: int) -> Task:
        """This task at another batch size and step budget, stopping at its target."""
        return dataclasses.replace(self, batch=batch, budget=budget, every=every, stop_at_target=True)

    def run(self, method: Method, config: dict, seed: int, device: torch.device) -> Run:
        """One training run of ``method`` at ``config`` (its ``lr``, and the callback's options) on ``seed``."""
        data = self.data(seed, self.batch)
        test_x, test_y = tensors(data.test_set)
        torch.manual_seed(seed)
        model = self.model(method.optimizer, config["lr"], method.momentum)
        score = negative_mse if self.regression else accuracy
        tracker = (StopAtTarget if self.stop_at_target else TargetTracker)(
            test_x, test_y, self.target, self.every, score=score
        )
        callbacks = [tracker]
        if method.callback is not None:
            options = {**method.callback, **{k: v for k, v in config.items() if k != "lr"}}
            if options.get("fisher_type") == "mc":  # the likelihood of the task's loss
                options["likelihood"] = "gaussian" if self.regression else "categorical"
            callbacks.append(LowRankKFACCallback(log_stats=False, seed=seed, **options))
        epochs = self.max_epochs if self.budget < 0 else -1
        trainer = quiet_trainer(accelerator=device.type, max_epochs=epochs, max_steps=self.budget, callbacks=callbacks)
        trainer.fit(model, data)
        return Run(tracker.history, statistics.median(tracker.seconds))

    def data(self, seed: int, batch: int | None = None):
        return data_module(self.data_name, batch or BATCH[self.data_name], seed)

    def model(self, optimizer: str, lr: float, momentum: float):
        if self.regression:
            return MLPAutoencoder(self.in_features, lr=lr, momentum=momentum, optimizer=optimizer)
        return MLPClassifier(self.in_features, hidden=self.hidden, lr=lr, momentum=momentum, optimizer=optimizer)

    @property
    def metric(self) -> str:
        return "test MSE" if self.regression else "test accuracy"

    def shown(self, score: float) -> float:
        """The score as the task's metric (MSE is stored negated so that higher is better)."""
        return -score if self.regression else score


TASKS = [
    Task("digits", "digits", 64, 0.95, 6, 5),
    Task("mnist1d", "mnist1d", 40, 0.60, 12, 10),
    Task("digits-autoencoder", "digits", 64, -0.045, 15, 10, regression=True),
    Task("mnist1d-w1024", "mnist1d", 40, 0.60, 12, 10, hidden=(1024, 1024)),  # time_to_accuracy's wide task
]
#: The tasks of a plain run; the wide one is run on its own (``--tasks mnist1d-w1024``: ~20 min on 2 cores).
DEFAULT_TASKS = ["digits", "mnist1d", "digits-autoencoder"]


def methods(quick: bool) -> list[Method]:
    lrs = [0.03, 0.1, 0.3]
    dampings = [1e-3, 1e-2] if quick else [1e-3, 1e-2, 1e-1]
    curvature_grid = [{"lr": lr, "damping": d} for lr, d in itertools.product(lrs, dampings)]
    adam_lrs = [1e-3, 3e-3, 1e-2]
    soap_grid = [{"lr": lr} for lr in adam_lrs]
    curvature_default = {"lr": 0.1, "damping": 1e-2}  # the package's damping, the examples' SGD rate
    return [
        Method("sgd", "sgd", 0.9, None, [{"lr": lr} for lr in lrs], {"lr": 0.1}),
        Method("adam", "adam", 0.0, None, [{"lr": lr} for lr in adam_lrs], {"lr": 1e-3}),
        Method("kfac", "sgd", 0.9, {"step_rule": "kfac"}, curvature_grid, curvature_default),
        Method("ekfac", "sgd", 0.9, {"step_rule": "ekfac"}, curvature_grid, curvature_default),
        Method("kfac-mc", "sgd", 0.9, {"step_rule": "kfac", "fisher_type": "mc"}, curvature_grid, curvature_default),
        Method("ekfac-mc", "sgd", 0.9, {"step_rule": "ekfac", "fisher_type": "mc"}, curvature_grid, curvature_default),
        # SOAP's default rate: 3e-3, the SOAP paper's usual Adam rate (the package sets none: it is the SGD's).
        Method("soap", "sgd", 0.0, {"step_rule": "soap", "kl_clip": None}, soap_grid, {"lr": 3e-3}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller damping grid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="*", default=DEFAULT_TASKS, choices=[t.name for t in TASKS])
    args = parser.parse_args()
    device = torch.device(args.device)
    tasks = [t for t in TASKS if t.name in args.tasks]
    every_method = methods(args.quick)
    result = sweep(tasks, every_method, args.seeds, device, target=lambda t, _: t.target)
    table, grid, curves = [], [], {}
    for task in tasks:
        tuned, defaults = {}, {}
        for method in every_method:
            rows = result.rows(task.name, method, task.target)
            grid += [{"grid": row} for row in rows]
            tuned[method.name] = result.tuned(task.name, method, task.target)
            defaults[method.name] = next(row for row in rows if row["default"])
            runs = result.runs[(task.name, method.name, tuned[method.name]["config"])]
            curves[(task.name, method.name)] = [
                [(step, seconds, task.shown(score)) for step, seconds, score in run.history] for run in runs
            ]
        best_steps = min(tuned[m]["steps"] for m in ("sgd", "adam"))
        best_seconds = min(tuned[m]["seconds"] for m in ("sgd", "adam"))
        for method in every_method:
            best, default = tuned[method.name], defaults[method.name]
            table.append(
                {
                    "task": task.name, "method": method.name, "tuned config": best["config"], "seeds": best["seeds"],
                    "reached": best["reached"], "steps": best["steps"], "seconds": best["seconds"],
                    "ms/step": best["ms_per_step"], "steps / best baseline": best["steps"] / best_steps,
                    "time / best baseline": best["seconds"] / best_seconds, "default steps": default["steps"],
                    "default seconds": default["seconds"], "default / tuned time": default["seconds"] / best["seconds"],
                }
            )  # fmt: skip
    print("\nbest grid point per method and task; 'best baseline' is the better of tuned SGD and Adam:")
    print_table(table, list(table[0]))
    meta = {**device_record(device), "seeds": args.seeds, "targets": {t.name: t.shown(t.target) for t in tasks}}
    name = "step_rules" if args.tasks == DEFAULT_TASKS else "step_rules_" + "_".join(args.tasks)
    write_json(name, meta, table + grid)
    plot(tasks, every_method, curves, name)


def plot(tasks: list[Task], every_method: list[Method], curves: dict, name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for column, task in enumerate(tasks):
        plot_runs(axes, column, {method.name: curves[(task.name, method.name)] for method in every_method})
        for row, xlabel in enumerate(("optimizer steps", "training seconds (wall)")):
            ax = axes[row, column]
            ax.axhline(task.shown(task.target), color="k", ls="--", lw=0.8)
            ax.set(xlabel=xlabel, ylabel=task.metric, title=f"{task.name}: tuned, 3 seeds")
            if task.regression:
                ax.set_yscale("log")
                ax.set_ylim(top=0.1)
            else:
                ax.set_ylim(max(0.0, task.target - 0.4), 1.0)
            ax.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
