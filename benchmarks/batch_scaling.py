"""Steps and wall time to a target against the batch size: the regime K-FAC is for, beside SGD, Adam and Muon.

Tasks (``--tasks``), each at 4 batch sizes 32× apart:
- ``mlp``: mnist1d (20,000 generated signals), MLP 40-256-256-10, 80% test accuracy;
- ``cnn``: mnist1d, a 1D CNN (convs of 32 and 64 channels, kernel 5, each with max-pooling, a hidden linear
  layer of 128 and a linear head), 95% test accuracy;
- ``lm``: the byte GPT of ``benchmarks.language_model`` on the Python docs, validation loss 2.8 (slow: run
  it on its own, ``--tasks lm``).

Methods, each inside the same Lightning loop (:mod:`benchmarks.harness`), each tuned at every batch size on a grid
whose learning rates are centred on the method's rate at the smallest batch times √(batch / smallest batch),
× {1/3, 1, 3} (× {1/3, 1, 3, 9} for Muon and the normalized step, whose best sat at the top of the smaller grid):
- ``sgd``: SGD with momentum 0.9; ``adam``: Adam (AdamW for the language model); ``muon``: torch's Muon on the
  hidden nn.Linear matrices and AdamW on the rest, one optimizer (torch's Muon takes 2-D matrices only, so a
  conv's weight is AdamW's);
- ``kfac``: SGD with momentum 0.9 and the callback; its grid adds damping ∈ {1e-2, 1e-1}, and its tuned point is
  the best of this grid and of ``kfac-default``'s variants;
- ``kfac-default``: the callback at its defaults with the examples' SGD rate 0.1 at every batch size (no
  tuning); its grid changes one option at a time (the KL clip 1e-2 or off, the factor decay 0.9): do the defaults
  hold at every batch size?
- ``normalized``: the callback's ``step_size: normalized`` (relative damping, every layer handled,
  :class:`~lightning_lrkfac.optim.KFACWithAdamW`) on Muon's grid; ``normalized-default``: the same at the package's
  defaults (π-damping) and Muon's rate 0.02 at every batch size.

The harness's sweep per batch size: every grid point on seed 0, the methods alternating; then each method's best
point (:func:`benchmarks.harness.best_point`) and its default on seeds 1 and 2 (``--quick``: seed 0 only); the figures
are medians over the seeds. A run stops at the target or at its step budget. Wall time counts training steps only, not
the test evaluations. torch's Muon runs its Newton–Schulz iteration in bfloat16, slow on a CPU: read Muon's steps
beside its time.

``--step-cost`` instead times a step with and without the callback against the batch size (an MLP of width
1024 on 1024 inputs, and a CNN of 3 convs, 32/64/64 channels at strides 1/2/2, on 28×28 inputs, synthetic
batches), arms interleaved, next to the flop model of ``benchmarks.step_overhead``.

``--damping`` instead compares ``damping_mode`` π and relative at the same grid points, for ``kfac`` and the
normalized step, on the MLP and the CNN at a small and a large batch (``batch_scaling_damping.json``).
``--summarize`` remakes the summary rows of the result files from their grid rows.

    python -m benchmarks.batch_scaling [--quick]       # mlp and cnn: about an hour on 2 CPU cores (--quick: 25 min)
    python -m benchmarks.batch_scaling --step-cost     # about 10 minutes
    python -m benchmarks.batch_scaling --damping       # about 25 minutes
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
from .harness import Method, Run, best_point, sweep
from .training import StopAtTarget, accuracy, quiet_trainer, tensors

MNIST1D_SAMPLES = 20_000
#: One option changed from the defaults at a time, at the default rate: do the defaults hold at every batch size?
DEFAULT_VARIANTS: list[dict[str, Any]] = [{}, {"kl_clip": 1e-2}, {"kl_clip": None}, {"factor_decay": 0.9}]
NORMALIZED_DEFAULT = {"step_size": "normalized", "kl_clip": None}
NORMALIZED = {**NORMALIZED_DEFAULT, "damping_mode": "relative"}
PEERS = ("sgd", "adam", "muon")
#: Muon's and the normalized step's rate factors: their best sat at the top of × {1/3, 1, 3} on the MLP.
MUON_FACTORS = (1 / 3, 1.0, 3.0, 9.0)
#: Each curvature method and the untuned default it is compared with.
DEFAULT_OF = {"kfac": "kfac-default", "normalized": "normalized-default"}
#: The methods whose tuned point may also come from another method's grid: kfac's from its defaults' variants.
ALSO_TUNED_ON = {"kfac": ("kfac-default",)}


def _mnist1d(batch: int, seed: int, budget: int):
    """The data module of a run, set up (its test set is read before the fit); the signals are generated once per
    process (``MNIST1DDataModule`` caches them)."""
    module = MNIST1DDataModule(batch, num_samples=MNIST1D_SAMPLES, seed=seed)
    module.setup("fit")
    return module


def _python_docs(batch: int, seed: int, budget: int):
    from .language_model import CONTEXT

    module = PythonDocsDataModule(CONTEXT, batch, windows_per_epoch=budget * batch)
    module.seed = seed
    module.setup("fit")
    return module


def _test_set(data) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    x, y = tensors(data.test_set)
    return x, y, accuracy


def _validation_windows(data) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    from .language_model import VALIDATION_WINDOWS, negative_loss

    windows = [data.val_set[i] for i in range(VALIDATION_WINDOWS)]
    x, y = (torch.stack(parts) for parts in zip(*windows))
    return x, y, negative_loss


@dataclass(frozen=True)
class Family:
    """A model and data at several batch sizes: per batch size the step budget and how often the score is read."""

    name: str
    batches: tuple[int, ...]
    target: float  # on the score (higher is better)
    metric: str
    #: The rates of sgd, adam, muon and kfac at the smallest batch.
    base_lrs: dict[str, float]
    budgets: dict[int, int]
    every: dict[int, int]
    model: Callable[..., pl.LightningModule]
    data: Callable[[int, int, int], Any] = _mnist1d
    evaluation: Callable[[Any], tuple[torch.Tensor, torch.Tensor, Callable]] = _test_set
    adam: str = "adam"

    def at(self, batch: int) -> BatchTask:
        return BatchTask(self, batch)

    def shown(self, score: float) -> float:
        """The score as the task's metric (a loss is stored negated so that higher is better)."""
        return -score if self.name == "lm" else score


@dataclass(frozen=True)
class BatchTask:
    """One family at one batch size: the harness's task (:class:`benchmarks.harness.Task`)."""

    family: Family
    batch: int

    @property
    def name(self) -> str:
        return f"{self.family.name} batch {self.batch}"

    @property
    def budget(self) -> int:
        return self.family.budgets[self.batch]

    def run(self, method: Method, config: dict, seed: int, device: torch.device) -> Run:
        family = self.family
        data = family.data(self.batch, seed, self.budget)
        x, y, score = family.evaluation(data)
        torch.manual_seed(seed)
        model = family.model(lr=config["lr"], momentum=method.momentum, optimizer=method.optimizer)
        tracker = StopAtTarget(x, y, family.target, family.every[self.batch], score=score)
        callbacks: list[pl.Callback] = [tracker]
        if method.callback is not None:
            options = {**method.callback, **{k: v for k, v in config.items() if k != "lr"}}
            callbacks.append(LowRankKFACCallback(log_stats=False, seed=seed, **options))
        trainer = quiet_trainer(accelerator=device.type, max_steps=self.budget, callbacks=callbacks)
        trainer.fit(model, data)
        return Run(tracker.history, statistics.median(tracker.seconds))


def _gpt(**kwargs) -> pl.LightningModule:
    from .language_model import CONTEXT, DEPTH, HEADS, VOCABULARY, WIDTH

    return GPTLanguageModel(VOCABULARY, CONTEXT, WIDTH, DEPTH, HEADS, tie_weights=True, **kwargs)


BATCHES = (128, 512, 2048, 4096)
FAMILIES = [
    Family(
        "mlp", BATCHES, 0.80, "test accuracy", {"sgd": 0.1, "adam": 1e-3, "muon": 0.02, "kfac": 0.1},
        {128: 2000, 512: 800, 2048: 300, 4096: 200}, {128: 10, 512: 5, 2048: 2, 4096: 2},
        functools.partial(MLPClassifier, in_features=40, hidden=(256, 256)),
    ),
    Family(
        "cnn", BATCHES, 0.95, "test accuracy", {"sgd": 0.05, "adam": 1e-3, "muon": 0.02, "kfac": 0.05},
        {128: 1500, 512: 600, 2048: 200, 4096: 120}, {128: 10, 512: 5, 2048: 2, 4096: 2},
        functools.partial(Conv1dClassifier, length=40, channels=(32, 64), kernel_size=5, hidden=(128,)),
    ),
    Family(
        "lm", (4, 16, 64, 128), -2.8, "validation loss", {"sgd": 0.03, "adam": 2e-3, "muon": 0.01, "kfac": 0.1},
        {4: 800, 16: 300, 64: 120, 128: 80}, {4: 20, 16: 10, 64: 5, 128: 5}, _gpt, _python_docs,
        _validation_windows, adam="adamw",
    ),
]  # fmt: skip


def methods(family: Family, batch: int) -> list[Method]:
    """Each method with its grid at this batch size (rates scaled by √(batch / smallest batch))."""
    scale = math.sqrt(batch / family.batches[0])

    def rates(name: str, factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)) -> list[float]:
        return [family.base_lrs[name] * scale * factor for factor in factors]

    def grid(name: str, factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)) -> tuple[dict, ...]:
        return tuple({"lr": lr} for lr in rates(name, factors))

    kfac_grid = tuple({"lr": lr, "damping": d} for lr in rates("kfac") for d in (1e-2, 1e-1))
    variants = tuple({"lr": 0.1, **variant} for variant in DEFAULT_VARIANTS)
    return [
        Method("sgd", "sgd", 0.9, None, grid("sgd")),
        Method("adam", family.adam, 0.0, None, grid("adam")),
        Method("muon", "muon", 0.0, None, grid("muon", MUON_FACTORS)),
        Method("kfac", "sgd", 0.9, {}, kfac_grid),
        Method("kfac-default", "sgd", 0.9, {}, variants, default=variants[0]),
        Method("normalized", "kfac-adamw", 0.0, NORMALIZED, grid("muon", MUON_FACTORS)),
        Method("normalized-default", "kfac-adamw", 0.0, NORMALIZED_DEFAULT, ({"lr": 0.02},), default={"lr": 0.02}),
    ]


def _confirmed(rows: list[dict]) -> list[dict]:
    """The rows of one method that ran on the most seeds: its confirmed best point (and its default)."""
    most = max(row["seeds"] for row in rows)
    return [row for row in rows if row["seeds"] == most]


def tuned_rows(family: Family, batch: int, grid: list[dict]) -> list[dict]:
    """One row per method at this batch size from its grid rows: its tuned point (a default method: its default),
    against the best peer and Muon, and each curvature method's untuned default against it. ``kfac``'s tuned point is
    the best of its own grid and of its defaults' one-option variants, both confirmed on every seed.

    Where no peer (or Muon) reached the target within the budget, the ratios are against the budget (steps) and the
    budget at the fastest peer's (Muon's) step time (seconds), upper bounds, marked by ``baseline reached`` (``Muon
    reached``) false.
    """
    by_method: dict[str, list[dict]] = {}
    for row in grid:
        by_method.setdefault(row["method"], []).append(row)
    rows = {}
    for name, mine in by_method.items():
        if name in DEFAULT_OF.values():
            row = next(r for r in mine if r["default"])
        else:
            row = best_point(
                _confirmed(mine) + sum((_confirmed(by_method[m]) for m in ALSO_TUNED_ON.get(name, ())), [])
            )
        rows[name] = {**row, "method": name, "task": family.name, "batch": batch}
    budget = family.budgets[batch]
    peer_steps = min(rows[name]["steps"] for name in PEERS)
    peer_seconds = min(rows[name]["seconds"] for name in PEERS)
    reached = math.isfinite(peer_steps)
    if not reached:
        peer_steps = budget
        peer_seconds = budget * min(rows[name]["ms_per_step"] for name in PEERS) / 1e3
    muon = rows["muon"]
    muon_reached = math.isfinite(muon["steps"])
    muon_steps = muon["steps"] if muon_reached else budget
    muon_seconds = muon["seconds"] if muon_reached else budget * muon["ms_per_step"] / 1e3
    for row in rows.values():
        row["baseline reached"] = reached
        row["steps / baseline"] = row["steps"] / peer_steps
        row["time / baseline"] = row["seconds"] / peer_seconds
        row["Muon reached"] = muon_reached
        row["steps / Muon"] = row["steps"] / muon_steps
        row["time / Muon"] = row["seconds"] / muon_seconds
    for tuned, default in DEFAULT_OF.items():
        rows[tuned]["default / tuned steps"] = rows[default]["steps"] / rows[tuned]["steps"]
        rows[tuned]["default / tuned time"] = rows[default]["seconds"] / rows[tuned]["seconds"]
    return list(rows.values())


TABLE_COLUMNS = ["task", "batch", "method", "config", "reached", "steps", "seconds", "ms_per_step",
                 "steps / baseline", "time / baseline", "steps / Muon", "time / Muon"]  # fmt: skip


def train(args: argparse.Namespace, device: torch.device) -> None:
    families = [f for f in FAMILIES if f.name in args.tasks]
    seeds = 1 if args.quick else args.seeds
    for family in families:  # one file per family, so that each can be rerun alone
        table, grid = [], []
        for batch in args.batches or family.batches:
            every = methods(family, batch)
            task = family.at(batch)
            result = sweep([task], every, seeds, device, target=lambda t, _: t.family.target, log=print)
            batch_grid = [{**row, "task": family.name, "batch": batch}
                          for method in every for row in result.rows(task.name, method, family.target)]  # fmt: skip
            grid += [{"grid": row} for row in batch_grid]
            table += tuned_rows(family, batch, batch_grid)
            print(f"{family.name} batch {batch}: done", flush=True)
            print_table([r for r in table if r["batch"] == batch], TABLE_COLUMNS)
        meta = {**device_record(device), "seeds": seeds, "target": family.shown(family.target), "metric": family.metric}
        meta |= {"budgets": family.budgets}
        write_json(f"batch_scaling_{family.name}", meta, table + grid)
    print("\nper method and batch size, its tuned point; best peer = the best of tuned sgd, adam, muon:")
    for family in families:
        print_table(load_rows(family), TABLE_COLUMNS)
    plot()


def summarize(families: list[Family]) -> None:
    """Remake each family's summary rows from the grid rows of its result file (after a change to the summary rule),
    the grid and meta kept."""
    for family in families:
        path = RESULTS / f"batch_scaling_{family.name}.json"
        result = json.loads(path.read_text())
        grid = [row["grid"] for row in result["rows"] if "grid" in row]
        table = [row for batch in dict.fromkeys(r["batch"] for r in grid)
                 for row in tuned_rows(family, batch, [r for r in grid if r["batch"] == batch])]  # fmt: skip
        write_json(f"batch_scaling_{family.name}", result["meta"], table + [{"grid": row} for row in grid])
        print_table(table, TABLE_COLUMNS)


def load_rows(family: Family) -> list[dict]:
    """The summary rows (not the grid) of a family's result file."""
    result = json.loads((RESULTS / f"batch_scaling_{family.name}.json").read_text())
    return [r for r in result["rows"] if "grid" not in r]


def plot() -> None:
    """batch_scaling.png: steps and time to the target against the batch size, every task with a result file."""
    plt = pyplot()
    if plt is None:
        return
    from matplotlib.ticker import NullLocator

    families = [f for f in FAMILIES if (RESULTS / f"batch_scaling_{f.name}.json").exists()]
    figure, axes = plt.subplots(2, len(families), figsize=(5 * len(families), 8), squeeze=False)
    for column, family in enumerate(families):
        rows = load_rows(family)
        meta = json.loads((RESULTS / f"batch_scaling_{family.name}.json").read_text())["meta"]
        for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            mine = [r for r in rows if r["method"] == method]
            batches = [r["batch"] for r in mine]
            style = dict(color=f"C{index}", marker="o", label=method, ls="--" if method.endswith("default") else "-")
            axes[0, column].plot(batches, [r["steps"] for r in mine], **style)
            axes[1, column].plot(batches, [r["seconds"] for r in mine], **style)
        batches = sorted({r["batch"] for r in rows})
        first = min((r for r in rows if math.isfinite(r["steps"])), key=lambda r: (r["batch"], r["steps"]))
        perfect = [first["steps"] * first["batch"] / b for b in batches]
        axes[0, column].plot(batches, perfect, color="k", ls=":", lw=1, label="perfect scaling")
        for row, ylabel in enumerate(("steps to target", "training seconds to target")):
            ax = axes[row, column]
            ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel=ylabel)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(batches, [f"{b:,}" for b in batches])
            title = f"{family.name}: {family.metric} {family.shown(family.target):g}, median of {meta['seeds']} seeds"
            ax.set_title(title)
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


#: Where ``--damping`` compares the damping modes: a small and a large batch per family.
DAMPING_BATCHES = {"mlp": (128, 2048), "cnn": (512, 2048)}


def damping(args: argparse.Namespace, device: torch.device) -> None:
    """``damping_mode`` π against relative at the same grid points, for ``kfac`` (SGD, momentum 0.9) and the
    normalized step, on the MLP and CNN at two batch sizes; the harness's sweep (grid on seed 0, each method's best
    point and its default on the other seeds)."""
    rows = []
    for family in [f for f in FAMILIES if f.name in DAMPING_BATCHES and f.name in args.tasks]:
        for batch in DAMPING_BATCHES[family.name]:
            every = {m.name: m for m in methods(family, batch)}
            kfac, normalized = every["kfac"], every["normalized"]
            arms = []
            for mode in ("pi", "relative"):
                kfac_options = {"damping_mode": mode}
                arms.append(Method(f"kfac {mode}", "sgd", 0.9, kfac_options, kfac.grid, default={"lr": 0.1}))
                normalized_options = {**NORMALIZED, "damping_mode": mode}
                arms.append(Method(f"normalized {mode}", "kfac-adamw", 0.0, normalized_options, normalized.grid,
                                   default={"lr": 0.02}))  # fmt: skip
            task = family.at(batch)
            result = sweep([task], arms, 1 if args.quick else args.seeds, device, lambda t, _: t.family.target)
            for arm in arms:
                mine = result.rows(task.name, arm, family.target)
                rows += [{**row, "task": family.name, "batch": batch, "tuned": row is best_point(_confirmed(mine))}
                         for row in mine]  # fmt: skip
            print_table([r for r in rows if r["batch"] == batch and r["task"] == family.name], DAMPING_COLUMNS)
    print("\nπ against relative damping at the same grid points (the tuned point marked):")
    print_table(rows, DAMPING_COLUMNS)
    write_json("batch_scaling_damping", {**device_record(device), "seeds": 1 if args.quick else args.seeds}, rows)


DAMPING_COLUMNS = ["task", "batch", "method", "config", "tuned", "default", "seeds", "reached", "steps", "seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seed 0 only (the grid)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", nargs="*", default=["mlp", "cnn"], choices=[f.name for f in FAMILIES])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batches", nargs="*", type=int, help="only these batch sizes (default: the task's four)")
    parser.add_argument("--step-cost", action="store_true", help="time steps against the batch size instead")
    parser.add_argument("--plot", action="store_true", help="only remake the plot from the result files")
    parser.add_argument("--damping", action="store_true", help="compare the damping modes at the same grid points")
    parser.add_argument("--summarize", action="store_true", help="only remake the summary rows from the grid rows")
    parser.add_argument("--step-batches", nargs="*", type=int, default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.damping:
        damping(args, device)
    elif args.summarize:
        summarize([f for f in FAMILIES if f.name in args.tasks])
        plot()
    elif args.plot:
        plot()
    elif args.step_cost:
        step_cost(args, device)
    else:
        train(args, device)


if __name__ == "__main__":
    main()
