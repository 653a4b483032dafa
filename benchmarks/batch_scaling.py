"""Steps and wall time to a target against the batch size: the regime K-FAC is for, beside SGD, Adam and Muon.

Tasks (``--tasks``), each at 4 batch sizes 32× apart:
- ``mlp``: mnist1d (20,000 generated signals), MLP 40-256-256-10, 80% test accuracy;
- ``cnn``: mnist1d, a 1D CNN (convs of 32 and 64 channels, kernel 5, each with max-pooling, a hidden linear
  layer of 128 and a linear head), 95% test accuracy;
- ``lm``: the byte GPT of ``benchmarks.language_model`` on the Python docs, validation loss 2.8 (slow: run
  it on its own, ``--tasks lm``).

Methods, each inside the same Lightning loop, each tuned at every batch size on a grid whose learning rates
are centred on the method's rate at the smallest batch times √(batch / smallest batch), × {1/3, 1, 3}:
- ``sgd``: SGD with momentum 0.9; ``adam``: Adam (AdamW for the language model); ``muon``: torch's Muon on the
  hidden nn.Linear matrices and AdamW on the rest, one optimizer (torch's Muon takes 2-D matrices only, so a
  conv's weight is AdamW's);
- ``kfac``: SGD with momentum 0.9 and the callback; its grid adds damping ∈ {1e-2, 1e-1};
- ``kfac-default``: the callback at its defaults with the examples' SGD rate 0.1 at every batch size (no
  tuning); beside it, the KL clip (1e-2, off) and the factor decay (0.9) changed alone: the check that the
  defaults hold at every batch size. All kfac runs count for kfac's tuned best.

Every grid point runs seed 0; its best point for steps and its best point for time (and the untuned default)
then run seeds 1 and 2, and the figures are medians of the 3 seeds; a run stops at the target or at its step
budget. Seeds are the
outer loop and the methods alternate inside it, so machine drift hits every arm alike. Wall time counts training
steps only, not the test evaluations. torch's Muon runs its Newton–Schulz iteration in bfloat16, slow on a CPU:
read Muon's steps beside its time.

``--step-cost`` instead times a step with and without the callback against the batch size (an MLP of width
1024 on 1024 inputs, and a CNN of 3 convs, 32/64/64 channels at strides 1/2/2, on 28×28 inputs, synthetic
batches), arms interleaved, next to the flop model of ``benchmarks.step_overhead``.

    python -m benchmarks.batch_scaling                 # mlp and cnn: about an hour on 2 CPU cores
    python -m benchmarks.batch_scaling --step-cost     # about 10 minutes
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import MNIST1DDataModule, PythonDocsDataModule
from lightning_lrkfac.examples.models import CNNClassifier, Conv1dClassifier, GPTLanguageModel, MLPClassifier

from .common import RESULTS, device_record, print_table, pyplot, write_json
from .harness import Method
from .training import StopAtTarget, accuracy, label, quiet_trainer, tensors

SEEDS = 3
MNIST1D_SAMPLES = 20_000
#: One option changed from the defaults at a time, at the default rate: do the defaults hold at every batch size?
DEFAULT_VARIANTS: list[dict[str, Any]] = [{}, {"kl_clip": 1e-2}, {"kl_clip": None}, {"factor_decay": 0.9}]


def mnist1d(batch_size: int, seed: int) -> MNIST1DDataModule:
    """The data module of a run, set up (its test set is read before the fit); the signals are generated once per
    process (``MNIST1DDataModule`` caches them)."""
    module = MNIST1DDataModule(batch_size, num_samples=MNIST1D_SAMPLES, seed=seed)
    module.setup("fit")
    return module


@dataclass(frozen=True)
class Task:
    """A model and data, the batch sizes, and per batch size the step budget and how often the score is read."""

    name: str
    batches: tuple[int, ...]
    target: float  # on the score (higher is better)
    metric: str
    #: The rates of sgd, adam, muon and kfac at the smallest batch.
    base_lrs: dict[str, float]
    budgets: dict[int, int]
    every: dict[int, int]
    model: Callable[..., pl.LightningModule]
    adam: str = "adam"

    def data(self, batch: int, seed: int):
        if self.name == "lm":
            from .language_model import CONTEXT

            module = PythonDocsDataModule(CONTEXT, batch, windows_per_epoch=self.budgets[batch] * batch)
            module.seed = seed
            module.setup("fit")
            return module
        return mnist1d(batch, seed)

    def evaluation(self, data) -> tuple[torch.Tensor, torch.Tensor, Callable]:
        if self.name == "lm":
            from .language_model import VALIDATION_WINDOWS, negative_loss

            windows = [data.val_set[i] for i in range(VALIDATION_WINDOWS)]
            x, y = (torch.stack(parts) for parts in zip(*windows))
            return x, y, negative_loss
        x, y = tensors(data.test_set)
        return x, y, accuracy

    def shown(self, score: float) -> float:
        return -score if self.name == "lm" else score


def _gpt(**kwargs) -> pl.LightningModule:
    from .language_model import CONTEXT, DEPTH, HEADS, VOCABULARY, WIDTH

    return GPTLanguageModel(VOCABULARY, CONTEXT, WIDTH, DEPTH, HEADS, tie_weights=True, **kwargs)


BATCHES = (128, 512, 2048, 4096)
TASKS = [
    Task(
        "mlp", BATCHES, 0.80, "test accuracy", {"sgd": 0.1, "adam": 1e-3, "muon": 0.02, "kfac": 0.1},
        {128: 2000, 512: 800, 2048: 300, 4096: 200}, {128: 10, 512: 5, 2048: 2, 4096: 2},
        functools.partial(MLPClassifier, in_features=40, hidden=(256, 256)),
    ),
    Task(
        "cnn", BATCHES, 0.95, "test accuracy", {"sgd": 0.05, "adam": 1e-3, "muon": 0.02, "kfac": 0.05},
        {128: 1500, 512: 600, 2048: 200, 4096: 120}, {128: 10, 512: 5, 2048: 2, 4096: 2},
        functools.partial(Conv1dClassifier, length=40, channels=(32, 64), kernel_size=5, hidden=(128,)),
    ),
    Task(
        "lm", (4, 16, 64, 128), -2.8, "validation loss", {"sgd": 0.03, "adam": 2e-3, "muon": 0.01, "kfac": 0.1},
        {4: 800, 16: 300, 64: 120, 128: 80}, {4: 20, 16: 10, 64: 5, 128: 5}, _gpt, adam="adamw",
    ),
]  # fmt: skip


def methods(task: Task, batch: int) -> list[Method]:
    """Each method with its grid at this batch size (rates scaled by √(batch / smallest batch))."""
    scale = math.sqrt(batch / task.batches[0])

    def rates(name: str) -> list[float]:
        return [task.base_lrs[name] * scale * factor for factor in (1 / 3, 1.0, 3.0)]

    kfac_grid = [{"lr": lr, "damping": d} for lr in rates("kfac") for d in (1e-2, 1e-1)]
    defaults = [{"lr": 0.1, **variant} for variant in DEFAULT_VARIANTS]
    return [
        Method("sgd", "sgd", 0.9, None, [{"lr": lr} for lr in rates("sgd")]),
        Method("adam", task.adam, 0.0, None, [{"lr": lr} for lr in rates("adam")]),
        Method("muon", "muon", 0.0, None, [{"lr": lr} for lr in rates("muon")]),
        Method("kfac", "sgd", 0.9, {}, kfac_grid),
        Method("kfac-default", "sgd", 0.9, {}, defaults),
    ]


def one_run(task: Task, batch: int, method: Method, config: dict, seed: int, device: torch.device) -> dict:
    data = task.data(batch, seed)
    x, y, score = task.evaluation(data)
    torch.manual_seed(seed)
    model = task.model(lr=config["lr"], momentum=method.momentum, optimizer=method.optimizer)
    tracker = StopAtTarget(x, y, task.target, task.every[batch], score=score)
    callbacks: list[pl.Callback] = [tracker]
    if method.callback is not None:
        options = {**method.callback, **{k: v for k, v in config.items() if k != "lr"}}
        callbacks.append(LowRankKFACCallback(log_stats=False, seed=seed, **options))
    trainer = quiet_trainer(accelerator=device.type, max_steps=task.budgets[batch], callbacks=callbacks)
    trainer.fit(model, data)
    return {
        "steps": tracker.steps_to_target or math.inf,
        "seconds": tracker.seconds_to_target or math.inf,
        "best": task.shown(tracker.best),
        "ms_per_step": 1e3 * statistics.median(tracker.seconds),
    }


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def train(args: argparse.Namespace, device: torch.device) -> None:
    tasks = [t for t in TASKS if t.name in args.tasks]
    results: dict[tuple[str, int, str, str], list[dict]] = {}

    def run(task: Task, batch: int, method: Method, config: dict, seed: int) -> None:
        result = one_run(task, batch, method, config, seed, device)
        results.setdefault((task.name, batch, method.name, label(config)), []).append(result)

    for task in tasks:
        for batch in task.batches:
            every = methods(task, batch)
            for index in range(max(len(m.grid) for m in every)):  # grid points alternate across methods
                for method in every:
                    if index < len(method.grid):
                        run(task, batch, method, method.grid[index], 0)
            chosen = {m.name: chosen_configs(task, batch, m, results) for m in every}
            for seed in range(1, args.seeds):
                for method in every:
                    for config in chosen[method.name]:
                        run(task, batch, method, config, seed)
            print(f"{task.name} batch {batch}: done", flush=True)

    grid = [
        {
            "task": task.name,
            "batch": batch,
            "method": method.name,
            "config": label(config),
            "seeds": len(runs),
            "reached": sum(math.isfinite(r["steps"]) for r in runs),
            "steps": median(runs, "steps"),
            "seconds": median(runs, "seconds"),
            "ms/step": median(runs, "ms_per_step"),
            "best score": median(runs, "best"),
        }
        for task in tasks
        for batch in task.batches
        for method in methods(task, batch)
        for config in method.grid
        for runs in [results[(task.name, batch, method.name, label(config))]]
    ]
    table = [row for task in tasks for row in summary_table(task, grid, args.seeds)]
    print("\nevery grid point (seed 0; the chosen points: median over seeds):")
    print_table(grid, list(grid[0]))
    print("\nper method and batch size, its best point for steps and for time; baseline = best of sgd, adam, muon:")
    print_table(table, list(table[0]))
    for task in tasks:  # one file per task, so that each task can be rerun alone
        meta = {**device_record(device), "seeds": args.seeds, "target": task.shown(task.target), "metric": task.metric}
        mine = [r for r in table if r["task"] == task.name] + [{"grid": r} for r in grid if r["task"] == task.name]
        write_json(f"batch_scaling_{task.name}", meta, mine)
    plot()


def chosen_configs(task: Task, batch: int, method: Method, results: dict) -> list[dict]:
    """The points that run every seed: seed 0's best for steps and best for time (the default's rate too)."""
    seed0 = {label(c): (results[(task.name, batch, method.name, label(c))][0], c) for c in method.grid}
    by_steps = min(seed0.values(), key=lambda rc: (rc[0]["steps"], rc[0]["seconds"]))[1]
    by_time = min(seed0.values(), key=lambda rc: (rc[0]["seconds"], rc[0]["steps"]))[1]
    chosen = [by_steps] + ([by_time] if by_time != by_steps else [])
    default = method.grid[0]
    return chosen + ([default] if method.name == "kfac-default" and default not in chosen else [])


def summary_table(task: Task, grid: list[dict], seeds: int) -> list[dict]:
    """The summary rows of a task from its grid rows: per batch size, the points every seed ran."""
    table = []
    for batch in task.batches:
        summaries: dict[str, list[dict]] = {}
        for row in grid:
            if row["task"] == task.name and row["batch"] == batch and row["seeds"] == seeds:
                summaries.setdefault(row["method"], []).append(row)
        # every kfac run counts for kfac
        summaries["kfac"] += [{**r, "config": "defaults, " + r["config"]} for r in summaries["kfac-default"]]
        table += summarize(task, batch, summaries)
    return table


def summarize(task: Task, batch: int, summaries: dict[str, list[dict]]) -> list[dict]:
    """One row per method: its best point for steps and for time, and both against the best baseline.

    Where no baseline reached the target within the budget, the ratios are against the budget (steps) and the
    budget at the fastest baseline's step time (seconds), upper bounds, marked by ``baseline reached`` false.
    """
    best = {
        name: (
            min(rows, key=lambda r: (r["steps"], r["seconds"])),
            min(rows, key=lambda r: (r["seconds"], r["steps"])),
        )
        for name, rows in summaries.items()
    }
    peers = ("sgd", "adam", "muon")
    baseline_steps = min(best[name][0]["steps"] for name in peers)
    baseline_seconds = min(best[name][1]["seconds"] for name in peers)
    reached = math.isfinite(baseline_steps)
    if not reached:
        baseline_steps = task.budgets[batch]
        baseline_seconds = task.budgets[batch] * min(best[name][1]["ms/step"] for name in peers) / 1e3
    default = next(r for r in summaries["kfac-default"] if r["config"] == "lr=0.1")
    rows = []
    for name, (by_steps, by_time) in best.items():
        if name == "kfac-default":
            by_steps = by_time = default
        rows.append(
            {
                "task": task.name,
                "batch": batch,
                "method": name,
                "steps config": by_steps["config"],
                "steps": by_steps["steps"],
                "time config": by_time["config"],
                "seconds": by_time["seconds"],
                "ms/step": by_time["ms/step"],
                "baseline reached": reached,
                "steps / baseline": by_steps["steps"] / baseline_steps,
                "time / baseline": by_time["seconds"] / baseline_seconds,
                "default / tuned steps": default["steps"] / best["kfac"][0]["steps"],
                "default / tuned time": default["seconds"] / best["kfac"][1]["seconds"],
            }
        )
    return rows


def summarize_files() -> None:
    """Remake each result file's summary rows from its grid rows (after a change to the summary), then the plot."""
    for task in TASKS:
        path = RESULTS / f"batch_scaling_{task.name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            grid = [r["grid"] for r in result["rows"] if "grid" in r]
            table = summary_table(task, grid, result["meta"]["seeds"])
            print_table(table, list(table[0]))
            write_json(path.stem, result["meta"], table + [{"grid": r} for r in grid])
    plot()


def plot() -> None:
    """batch_scaling.png: steps and time to the target against the batch size, every task with a result file."""
    plt = pyplot()
    if plt is None:
        return
    from matplotlib.ticker import NullLocator

    results = {t.name: json.loads((RESULTS / f"batch_scaling_{t.name}.json").read_text()) for t in TASKS
               if (RESULTS / f"batch_scaling_{t.name}.json").exists()}  # fmt: skip
    tasks = [t for t in TASKS if t.name in results]
    figure, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 8), squeeze=False)
    for column, task in enumerate(tasks):
        rows = [r for r in results[task.name]["rows"] if "grid" not in r]
        for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            mine = [r for r in rows if r["method"] == method]
            batches = [r["batch"] for r in mine]
            style = dict(color=f"C{index}", marker="o", label=method, ls="--" if method == "kfac-default" else "-")
            axes[0, column].plot(batches, [r["steps"] for r in mine], **style)
            axes[1, column].plot(batches, [r["seconds"] for r in mine], **style)
        first = min((r for r in rows if math.isfinite(r["steps"])), key=lambda r: (r["batch"], r["steps"]))
        perfect = [first["steps"] * first["batch"] / b for b in task.batches]
        axes[0, column].plot(task.batches, perfect, color="k", ls=":", lw=1, label="perfect scaling")
        for row, ylabel in enumerate(("steps to target", "training seconds to target")):
            ax = axes[row, column]
            ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel=ylabel)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(list(task.batches), [f"{b:,}" for b in task.batches])
            seeds = results[task.name]["meta"]["seeds"]
            ax.set_title(f"{task.name}: {task.metric} {task.shown(task.target):g}, median of {seeds} seeds")
            ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "batch_scaling.png", dpi=120)


def step_cost(args: argparse.Namespace, device: torch.device) -> None:
    """Step time with and without the callback against the batch size, interleaved, beside the flop model."""
    from .step_overhead import flop_model, synthetic, time_steps

    models = {
        "mlp-w1024": (functools.partial(MLPClassifier, in_features=1024, hidden=(1024, 1024)), (1024,)),
        "cnn-28x28": (functools.partial(CNNClassifier, image_size=28, channels=(32, 64, 64), strides=(1, 2, 2)),
                      (1, 28, 28)),
    }  # fmt: skip
    rows = []
    for name, (model, shape) in models.items():
        for batch in args.step_batches:
            steps = 12 if batch >= 1024 else 30
            data = synthetic(steps + 2, batch, shape, 10)
            sgd, kfac = [], []
            for _ in range(args.repeats):
                sgd.append(time_steps(model, data, device, None, steps)[0])
                callback = LowRankKFACCallback(log_stats=False)
                kfac.append(time_steps(model, data, device, callback, steps)[0])
            row = {"model": name, "batch": batch, "sgd_ms": 1e3 * statistics.median(sgd)}
            row["kfac_ms"] = 1e3 * statistics.median(kfac)
            row["ratio"] = row["kfac_ms"] / row["sgd_ms"]
            row["model_ratio"] = flop_model(callback.engine.model, callback, data)["model_ratio"]
            row["overhead"] = row["ratio"] - row["model_ratio"]
            rows.append(row)
            print_table([row], list(row))
    print("\nstep time with the callback / without, against the batch size (median over steps and repeats):")
    print_table(rows, list(rows[0]))
    write_json("batch_scaling_step_cost", {**device_record(device), "repeats": args.repeats}, rows)
    plt = pyplot()
    if plt is None:
        return
    figure, ax = plt.subplots(figsize=(6, 4))
    for index, name in enumerate(models):
        mine = [r for r in rows if r["model"] == name]
        batches = [r["batch"] for r in mine]
        ax.plot(batches, [r["ratio"] for r in mine], color=f"C{index}", marker="o", label=f"{name} measured")
        ax.plot(batches, [r["model_ratio"] for r in mine], color=f"C{index}", ls=":", label=f"{name} flop model")
    ax.set(xscale="log", xlabel="batch size", ylabel="step time / SGD step time", title="callback step cost")
    ax.set_xticks(args.step_batches, [f"{b:,}" for b in args.step_batches], minor=False)
    ax.minorticks_off()
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "batch_scaling_step_cost.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", nargs="*", default=["mlp", "cnn"], choices=[t.name for t in TASKS])
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--step-cost", action="store_true", help="time steps against the batch size instead")
    parser.add_argument(
        "--summarize", action="store_true", help="only remake the summary rows and the plot from the result files' grid"
    )
    parser.add_argument("--step-batches", nargs="*", type=int, default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.summarize:
        summarize_files()
    elif args.step_cost:
        step_cost(args, device)
    else:
        train(args, device)


if __name__ == "__main__":
    main()
