"""A byte-level GPT on real text, raced against the optimizers language-model users pick: AdamW and Muon.

Task: the nanoGPT layout (pre-LN blocks, tied token embedding and head, width 128, 4 layers, 4 heads, context
128, vocabulary 256 bytes) on the Python reference documentation every Python ships (``pydoc_data.topics``,
:class:`~lightning_lrkfac.examples.data.PythonDocsDataModule`: the first 90% trains, validation is a fixed set of
64 windows of the next 5%). Validation loss against optimizer steps and against training wall time.

Methods, each inside the same Lightning loop:
- ``adamw``: AdamW (weight decay 0); ``muon``: torch's Muon on the blocks' matrices and AdamW (lr 3e-3) on the
  embeddings, norms and biases, as one optimizer (:class:`~lightning_lrkfac.examples.optim.MuonWithAdamW`);
- ``sgd``: SGD with momentum 0.9;
- ``kfac`` / ``ekfac``: SGD with momentum 0.9 and the callback at its defaults (``step_rule`` kfac / ekfac);
  ``kfac-plain-tie``: ``kfac`` with the tied embedding left plain (``precondition_tied_embeddings=False``);
- ``soap``: plain SGD and the callback with ``step_rule="soap"``, ``kl_clip=None``.

Two batch sizes, 4× apart in tokens per step. For each, every method runs its learning-rate grid on seed 0; the
best point (least time to the target validation loss, else the lowest final loss) then runs seeds 1 and 2. Seeds
are the outer loop and the methods alternate inside it, so machine drift hits every arm alike. A run stops at the
target or at its step budget. Wall time counts training steps only, not the validation passes. torch's Muon runs
its Newton–Schulz iteration in bfloat16, which a CPU does slowly: read Muon's steps beside its time.

    python -m benchmarks.language_model [--quick]      # about 20 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import PythonDocsDataModule
from lightning_lrkfac.examples.models import GPTLanguageModel

from .common import RESULTS, device_record, plot_runs, print_table, pyplot, write_json
from .step_rules import Method
from .training import StopAtTarget, label, quiet_trainer

CONTEXT, WIDTH, DEPTH, HEADS, VOCABULARY = 128, 128, 4, 4, 256
VALIDATION_WINDOWS = 64


@dataclass(frozen=True)
class Regime:
    """A batch size, the steps a run may take and how often the validation loss is read."""

    batch_size: int
    budget: int
    every: int

    @property
    def tokens(self) -> int:
        return self.batch_size * CONTEXT


def rates(*lrs: float) -> list[dict]:
    """A learning-rate grid as step_rules' Method takes it."""
    return [{"lr": lr} for lr in lrs]


METHODS = [
    Method("adamw", "adamw", 0.0, None, rates(1e-3, 3e-3)),
    Method("muon", "muon", 0.0, None, rates(0.01, 0.02)),
    Method("sgd", "sgd", 0.9, None, rates(0.03, 0.1)),
    Method("kfac", "sgd", 0.9, {"step_rule": "kfac"}, rates(0.1, 0.3)),
    Method("kfac-plain-tie", "sgd", 0.9, {"step_rule": "kfac", "precondition_tied_embeddings": False}, rates(0.1, 0.3)),
    Method("ekfac", "sgd", 0.9, {"step_rule": "ekfac"}, rates(0.1, 0.3)),
    Method("soap", "sgd", 0.0, {"step_rule": "soap", "kl_clip": None}, rates(3e-3, 1e-2)),
]


def negative_loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> float:
    """−(validation cross-entropy in nats per byte): a score where higher is better."""
    return -float(F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).cpu(), targets.reshape(-1)))


def data(regime: Regime, seed: int) -> PythonDocsDataModule:
    module = PythonDocsDataModule(CONTEXT, regime.batch_size, windows_per_epoch=regime.budget * regime.batch_size)
    module.seed = seed
    module.setup("fit")
    return module


def one_run(regime: Regime, method: Method, lr: float, seed: int, target: float, device: torch.device) -> dict:
    module = data(regime, seed)
    windows = [module.val_set[i] for i in range(VALIDATION_WINDOWS)]
    val_x, val_y = (torch.stack(parts) for parts in zip(*windows))
    torch.manual_seed(seed)
    model = GPTLanguageModel(
        VOCABULARY, CONTEXT, WIDTH, DEPTH, HEADS, tie_weights=True, lr=lr, momentum=method.momentum,
        optimizer=method.optimizer,
    )  # fmt: skip
    tracker = StopAtTarget(val_x, val_y, -target, regime.every, score=negative_loss)
    callbacks: list[pl.Callback] = [tracker]
    if method.callback is not None:
        callbacks.append(LowRankKFACCallback(log_stats=False, seed=seed, **method.callback))
    trainer = quiet_trainer(accelerator=device.type, max_steps=regime.budget, max_epochs=1, callbacks=callbacks)
    trainer.fit(model, module)
    return {
        "steps": tracker.steps_to_target or math.inf,
        "seconds": tracker.seconds_to_target or math.inf,
        "final": -tracker.final,
        "seconds_per_step": statistics.median(tracker.seconds),
        "history": [(step, seconds, -value) for step, seconds, value in tracker.history],
    }


def best_lr(runs: dict[float, dict]) -> float:
    """The grid point with the least time to the target; if none reached it, the lowest final loss."""
    return min(runs, key=lambda lr: (runs[lr]["seconds"], runs[lr]["final"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed at the best grid point, not three")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--target", type=float, default=2.8, help="validation loss (nats per byte) to reach")
    parser.add_argument("--methods", nargs="*", default=[m.name for m in METHODS], choices=[m.name for m in METHODS])
    args = parser.parse_args()
    device = torch.device(args.device)
    seeds = 1 if args.quick else 3
    regimes = [Regime(8, 420, 20), Regime(32, 150, 10)]
    methods = [m for m in METHODS if m.name in args.methods]
    grid: dict[tuple[int, str], dict[float, dict]] = {}
    runs: dict[tuple[int, str], list[dict]] = {}
    for regime in regimes:
        for index in range(max(len(m.grid) for m in methods)):  # grid points alternate across methods
            for method in methods:
                if index < len(method.grid):
                    lr = method.grid[index]["lr"]
                    result = one_run(regime, method, lr, 0, args.target, device)
                    grid.setdefault((regime.batch_size, method.name), {})[lr] = result
                    print(f"batch {regime.batch_size} {method.name} lr={lr:g}: {result['steps']} steps", flush=True)
        for method in methods:
            runs[(regime.batch_size, method.name)] = [
                grid[(regime.batch_size, method.name)][best_lr(grid[(regime.batch_size, method.name)])]
            ]
        for seed in range(1, seeds):
            for method in methods:
                lr = best_lr(grid[(regime.batch_size, method.name)])
                runs[(regime.batch_size, method.name)].append(one_run(regime, method, lr, seed, args.target, device))

    table = []
    for regime in regimes:
        medians = {
            m.name: {
                key: statistics.median(r[key] for r in runs[(regime.batch_size, m.name)])
                for key in ("steps", "seconds", "seconds_per_step", "final")
            }
            for m in methods
        }
        reference = {name: medians[name] for name in ("adamw", "muon") if name in medians}
        best_steps = min((m["steps"] for m in reference.values()), default=math.nan)
        for method in methods:
            mine = medians[method.name]
            results = runs[(regime.batch_size, method.name)]
            table.append(
                {
                    "batch": regime.batch_size,
                    "tokens/step": regime.tokens,
                    "method": method.name,
                    "lr": best_lr(grid[(regime.batch_size, method.name)]),
                    "reached": sum(math.isfinite(r["steps"]) for r in results),
                    "steps": mine["steps"],
                    "seconds": mine["seconds"],
                    "ms/step": 1e3 * mine["seconds_per_step"],
                    "steps / better of AdamW, Muon": mine["steps"] / best_steps,
                    "steps / AdamW": mine["steps"] / reference["adamw"]["steps"] if "adamw" in reference else math.nan,
                    "time / AdamW": mine["seconds"] / reference["adamw"]["seconds"]
                    if "adamw" in reference
                    else math.nan,
                    "time / Muon": mine["seconds"] / reference["muon"]["seconds"] if "muon" in reference else math.nan,
                    "final loss": mine["final"],
                }
            )
    grid_rows = [
        {
            "batch": batch,
            "method": name,
            "config": label({"lr": lr}),
            "steps": r["steps"],
            "seconds": r["seconds"],
            "final": r["final"],
        }
        for (batch, name), points in grid.items()
        for lr, r in points.items()
    ]
    print("\ngrid (seed 0):")
    print_table(grid_rows, list(grid_rows[0]))
    print(f"\nbest grid point per method, median of {seeds} seed(s); target validation loss {args.target}:")
    print_table(table, list(table[0]))
    meta = {
        **device_record(device),
        "seeds": seeds,
        "target": args.target,
        "model": {"width": WIDTH, "depth": DEPTH, "heads": HEADS, "context": CONTEXT, "vocabulary": VOCABULARY},
        "regimes": [{"batch": r.batch_size, "tokens": r.tokens, "budget": r.budget} for r in regimes],
    }
    write_json("language_model", meta, table + [{"grid": row} for row in grid_rows] + [
        {"curves": {"batch": batch, "method": name, "runs": [r["history"] for r in results]}}
        for (batch, name), results in runs.items()
    ])  # fmt: skip
    plot(regimes, methods, runs, args.target)


def plot(regimes: list[Regime], methods: list[Method], runs: dict, target: float) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(2, len(regimes), figsize=(5.5 * len(regimes), 7.5), squeeze=False)
    for column, regime in enumerate(regimes):
        histories = {m.name: [r["history"] for r in runs[(regime.batch_size, m.name)]] for m in methods}
        plot_runs(axes, column, histories)
        for row, xlabel in enumerate(("optimizer steps", "training seconds (wall)")):
            ax = axes[row, column]
            ax.axhline(target, color="k", ls="--", lw=0.8)
            ax.set(xlabel=xlabel, ylabel="validation loss (nats/byte)", ylim=(target - 0.3, 4.0))
            ax.set_title(f"byte GPT on Python docs, {regime.tokens:,} tokens/step")
            ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "language_model.png", dpi=120)


if __name__ == "__main__":
    main()
