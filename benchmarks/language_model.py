"""A byte-level GPT on real text, raced against the optimizers language-model users pick: AdamW and Muon.

Task: the nanoGPT layout (pre-LN blocks, tied token embedding and head, 4 layers, 4 heads, context 128,
vocabulary 256 bytes; width 128, and on request 256) on the Python reference documentation every Python ships
(``pydoc_data.topics``, :class:`~lightning_lrkfac.examples.data.PythonDocsDataModule`: the first 90% trains,
validation is a fixed set of 64 windows of the next 5%). Validation loss every 25 steps against optimizer steps and
training wall time; every run takes its whole budget (600 steps), so that one run gives the steps to every target.

Methods, each inside the same Lightning loop (:mod:`benchmarks.harness`):
- ``adamw``: AdamW (weight decay 0); ``muon``: torch's Muon on the blocks' matrices and AdamW (lr 3e-3) on the
  embeddings, norms and biases, as one optimizer (:class:`~lightning_lrkfac.examples.optim.MuonWithAdamW`);
- ``kfac``: SGD with momentum 0.9 and the callback at its defaults (the KL clip on);
- ``normalized``: the callback's ``step_size: normalized`` on the blocks' layers (``include: blocks.*``; rank 64,
  relative damping), :class:`~lightning_lrkfac.optim.KFACWithAdamW` with AdamW (lr 3e-3) on the rest, as Muon's
  setup; ``normalized-tie``: the same with the tied embedding/head block preconditioned too; ``normalized-rms``: the
  same with each layer's update at AdamW's RMS 0.2 (``update_norm: rms``, Moonlight's matching);
  ``normalized-capped``: the same with the statistics of at most 4 sequences a step (``statistics_examples: 4``);
  ``normalized-polar``: the same with each layer's update orthogonalized (``update_norm: polar``: Muon's Newton–Schulz
  on K-FAC's direction); ``normalized-lean``: capped, and folded into the factors every 4th step (``factor_update_interval: 4``);
  ``normalized-default``:
  the package's defaults with ``step_size: normalized`` (every layer handled, rank 16, π-damping) at Muon's 0.02.

Targets, from the runs: 2.4 and 2.0 nats per byte, and the deepest, 0.05 above the best validation loss that the
strongest tuned method reached within the budget. Two batch sizes 4× apart in tokens per step. Every method runs its
learning-rate grid on seed 0; the best point for the deepest target (and the default) then runs seeds 1 and 2
(``--quick``: seed 0 only). Wall time counts training steps only, not the validation passes. torch's Muon runs its
Newton–Schulz iteration in bfloat16, which a CPU does slowly: read Muon's steps beside its time.

    python -m benchmarks.language_model [--quick] [--width 256 --batches 8] [--methods …] [--output NAME]
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
from .harness import Method, Run, label, summary, sweep
from .training import TargetTracker, quiet_trainer

CONTEXT, WIDTH, DEPTH, HEADS, VOCABULARY = 128, 128, 4, 4, 256
VALIDATION_WINDOWS = 64
BUDGET, EVERY = 600, 25
#: The fixed targets (nats per byte); the deepest comes from the runs (:func:`deepest_target`).
TARGETS = (2.4, 2.0)
DEPTH_MARGIN = 0.05

#: The package's defaults with the normalized step (everything handled: blocks, embeddings, the tied block).
NORMALIZED_DEFAULT = {"step_size": "normalized", "kl_clip": None}
#: Tuned on this model (seed 0, 300 steps at 1,024 tokens: rank 16 / 32 / 64, exact, λ 1e-3 / 1e-2 / 1e-1, the
#: isotropic tail, π-damping at 1e-4): rank 64 with relative damping at λ 1e-2, on the blocks as Muon's setup.
NORMALIZED = {**NORMALIZED_DEFAULT, "damping_mode": "relative", "rank": 64, "include": ["blocks.*"]}
METHODS = [
    Method("adamw", "adamw", grid=({"lr": 1e-3}, {"lr": 3e-3})),
    Method("muon", "muon", grid=({"lr": 0.01}, {"lr": 0.02})),
    Method("kfac", "sgd", 0.9, {"step_rule": "kfac"}, grid=({"lr": 0.1}, {"lr": 0.3})),
    Method("normalized", "kfac-adamw", 0.0, NORMALIZED, grid=({"lr": 0.01}, {"lr": 0.02})),
    Method("normalized-tie", "kfac-adamw", 0.0, {**NORMALIZED, "include": ["blocks.*", "head"]}, grid=({"lr": 0.02},)),
    # AdamW's RMS 0.2 (Moonlight): ‖update‖ is 0.2·√n times Muon's for an m × n (m ≥ n) matrix, 2.3× at width 128
    Method(
        "normalized-rms", "kfac-adamw", 0.0, {**NORMALIZED, "update_norm": "rms"}, grid=({"lr": 3e-3}, {"lr": 6e-3})
    ),
    # the statistics of at most 4 sequences (512 tokens) a step: half the batch at 1,024 tokens, an eighth at 4,096
    Method(
        "normalized-capped",
        "kfac-adamw",
        0.0,
        {**NORMALIZED, "statistics_examples": 4},
        grid=({"lr": 0.01}, {"lr": 0.02}),
    ),
    # each layer's update orthogonalized as Muon's (Newton–Schulz on K-FAC's direction), at Muon's scale
    Method(
        "normalized-polar", "kfac-adamw", 0.0, {**NORMALIZED, "update_norm": "polar"}, grid=({"lr": 0.01}, {"lr": 0.02})
    ),
    # the statistics capped, and folded into the factors every 4th step only (the capture hooks are off on the other steps)
    Method(
        "normalized-lean",
        "kfac-adamw",
        0.0,
        {**NORMALIZED, "statistics_examples": 4, "factor_update_interval": 4},
        grid=({"lr": 0.01}, {"lr": 0.02}),
    ),
    Method("normalized-default", "kfac-adamw", 0.0, NORMALIZED_DEFAULT, grid=({"lr": 0.02},)),
]

#: What a plain run races; the update-norm and statistics-cap variants run on request (``--methods``).
DEFAULT_METHODS = ["adamw", "muon", "kfac", "normalized", "normalized-tie", "normalized-default"]


@dataclass(frozen=True)
class LanguageModelTask:
    """The byte GPT at one width and batch size."""

    width: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"width {self.width}, {self.tokens:,} tokens/step"

    @property
    def tokens(self) -> int:
        return self.batch_size * CONTEXT

    def run(self, method: Method, config: dict, seed: int, device: torch.device) -> Run:
        module = PythonDocsDataModule(CONTEXT, self.batch_size, windows_per_epoch=BUDGET * self.batch_size)
        module.seed = seed
        module.setup("fit")
        windows = [module.val_set[i] for i in range(VALIDATION_WINDOWS)]
        val_x, val_y = (torch.stack(parts) for parts in zip(*windows))
        torch.manual_seed(seed)
        model = GPTLanguageModel(
            VOCABULARY, CONTEXT, self.width, DEPTH, HEADS, tie_weights=True, lr=config["lr"],
            momentum=method.momentum, optimizer=method.optimizer,
        )  # fmt: skip
        tracker = TargetTracker(val_x, val_y, math.inf, EVERY, score=negative_loss)
        callbacks: list[pl.Callback] = [tracker]
        if method.callback is not None:
            callbacks.append(LowRankKFACCallback(log_stats=False, seed=seed, **method.callback))
        trainer = quiet_trainer(accelerator=device.type, max_steps=BUDGET, max_epochs=1, callbacks=callbacks)
        trainer.fit(model, module)
        return Run(tracker.history, statistics.median(tracker.seconds))


def negative_loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> float:
    """−(validation cross-entropy in nats per byte): a score where higher is better."""
    return -float(F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).cpu(), targets.reshape(-1)))


def deepest_target(result, task, methods: list[Method]) -> float:
    """−(0.05 + the lowest validation loss any method's best-final grid point reached): a score target."""
    best = max(
        max(row["best"] for row in result.rows(task.name, method, -math.inf)) for method in methods
    )  # scores: −loss
    return best - DEPTH_MARGIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seed 0 only (the grid)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--batches", nargs="*", type=int, default=[8, 32])
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=[m.name for m in METHODS])
    parser.add_argument("--output", help="the result file's name (default: language_model, with _w<width> if not 128)")
    args = parser.parse_args()
    device = torch.device(args.device)
    seeds = 1 if args.quick else 3
    tasks = [LanguageModelTask(args.width, batch) for batch in args.batches]
    methods = [m for m in METHODS if m.name in args.methods]
    results = {}
    for task in tasks:  # each task's deepest target comes from its own grid
        results[task.name] = sweep(
            [task], methods, seeds, device, target=lambda t, done: deepest_target(done, t, methods), log=print
        )
    rows, table, curves = [], [], []
    for task in tasks:
        result = results[task.name]
        deep = deepest_target(result, task, methods)
        targets = {f"{loss:g}": -loss for loss in TARGETS} | {"deepest": deep}
        for method in methods:
            grid = result.rows(task.name, method, deep)
            rows += [{"grid": row} for row in grid]
            best = result.tuned(task.name, method, deep)["config"]
            runs = result.runs[(task.name, method.name, best)]
            curves.append({"curves": {"task": task.name, "method": method.name, "runs": [r.history for r in runs]}})
            for name, target in targets.items():
                row = summary(task.name, method, _config(method, best), runs, target)
                row.update(target=name, loss=-target, width=task.width, tokens=task.tokens)
                table.append(row)
    _add_ratios(table)
    print(f"\nbest grid point per method (for the deepest target), median of {seeds} seed(s):")
    print_table(table, ["task", "method", "config", "target", "loss", "reached", "steps", "seconds", "ms_per_step",
                        "steps / Muon", "time / Muon", "best"])  # fmt: skip
    meta = {
        **device_record(device),
        "seeds": seeds,
        "budget": BUDGET,
        "every": EVERY,
        "model": {"width": args.width, "depth": DEPTH, "heads": HEADS, "context": CONTEXT, "vocabulary": VOCABULARY},
    }
    name = args.output or ("language_model" if args.width == WIDTH else f"language_model_w{args.width}")
    write_json(name, meta, table + rows + curves)
    plot(tasks, methods, curves, name)


def _config(method: Method, text: str) -> dict:
    return next(config for config in method.configs() if label(config) == text)


def _add_ratios(table: list[dict]) -> None:
    """Each row's steps and seconds against tuned Muon's and AdamW's at the same task and target."""
    for row in table:
        for peer in ("muon", "adamw"):
            other = next(
                (r for r in table if (r["task"], r["target"], r["method"]) == (row["task"], row["target"], peer)), None
            )
            for key in ("steps", "seconds"):
                ratio = row[key] / other[key] if other is not None and math.isfinite(other[key]) else math.nan
                row[f"{'steps' if key == 'steps' else 'time'} / {'Muon' if peer == 'muon' else 'AdamW'}"] = ratio


def plot(tasks: list[LanguageModelTask], methods: list[Method], curves: list[dict], name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7.5), squeeze=False)
    for column, task in enumerate(tasks):
        histories = {
            c["curves"]["method"]: [[(s, t, -v) for s, t, v in run] for run in c["curves"]["runs"]]
            for c in curves
            if c["curves"]["task"] == task.name
        }
        plot_runs(axes, column, histories)
        for row, xlabel in enumerate(("optimizer steps", "training seconds (wall)")):
            ax = axes[row, column]
            ax.set(xlabel=xlabel, ylabel="validation loss (nats/byte)", ylim=(1.4, 3.2))
            ax.set_title(f"byte GPT on Python docs, {task.name}")
            ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
