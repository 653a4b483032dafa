"""Trainer step time with the callback vs plain SGD on the same model and batches, side by side,
next to what a flop model of the curvature work predicts; the difference is implementation overhead.

Every other option at its default (factors every step, bases every 10, the KL clip on); two ranks,
the default (16) and 32, as separate arms of the same interleaved run. Cases: the
tiny models of the configs (MLP on mnist1d, CNN on 8×8 digits, GPT width 64 on sequences), a
depthwise-separable CNN, and realistic sizes on synthetic batches: an MLP of width 1024 at batch
256, a CNN on 28×28 inputs at batch 128, a GPT of width 256 with 4,096 tokens per step; on a GPU
also ResNet-18 on 32×32 batches (torchvision).

The flop model (per handled layer, n rows per step: batch × positions or output locations;
a, b the sizes of A and B; w the width a factor applies with: k low-rank, d dense, 1 diagonal;
m = k + p sketch columns):

- the layer's own forward and backward: 6·n·d_in·d_out (2·n·d_out for an embedding's lookup; the
  SGD step counts handled layers only, not attention scores or norms);
- applying both inverses to G: 4·a·b·(w_A + w_B), every step;
- statistics per factor update: 4·n·d·m per low-rank factor, 2·n·d² per dense one, n·d per
  diagonal one, plus n·a to unfold a convolution's patches (not for a low-rank A: its sketch is
  computed by two convolutions);
- a refresh, every ``basis_update_interval`` steps: 10·d·m² per low-rank factor, 10·d³ per dense one.

    python -m benchmarks.step_overhead [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
from torch import nn

from lightning_lrkfac import LowRankKFACCallback
from lightning_lrkfac.examples.data import ArithmeticSequencesDataModule, DigitsDataModule, MNIST1DDataModule
from lightning_lrkfac.examples.models import (
    CNNClassifier,
    DepthwiseCNNClassifier,
    GPTLanguageModel,
    MLPClassifier,
    ResNet18Classifier,
)
from lightning_lrkfac.layers import ConvLayer, EmbeddingLayer
from lightning_lrkfac.lowrank import DenseFactor, DiagonalFactor, KroneckerFactor, LowRankFactor
from lightning_lrkfac.options import KFACOptions

from .common import RESULTS, device_record, print_table, pyplot, write_json
from .training import StepTimer, quiet_trainer

RANKS = (KFACOptions().rank, 32)


def synthetic(batches: int, batch_size: int, shape: tuple[int, ...], classes: int, tokens: bool = False):
    """A loader of random inputs (or token ids) and labels; only time is measured."""
    generator = torch.Generator().manual_seed(0)
    count = batches * batch_size
    if tokens:
        x = torch.randint(0, classes, (count, *shape), generator=generator)
        y = torch.randint(0, classes, (count, *shape), generator=generator)
    else:
        x = torch.randn(count, *shape, generator=generator)
        y = torch.randint(0, classes, (count,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def cases(device: torch.device, quick: bool):
    """(name, model factory, data, callback options, steps)."""
    steps = 40 if quick else 120
    big = 20 if quick else 40
    yield "mlp-mnist1d", lambda: MLPClassifier(in_features=40, hidden=(256, 256)), MNIST1DDataModule(128), {}, steps
    yield "cnn-digits", lambda: CNNClassifier(), DigitsDataModule(64, as_images=True), {}, steps
    embeddings = {"precondition_embeddings": True}
    yield "gpt-w64-sequences", lambda: GPTLanguageModel(), ArithmeticSequencesDataModule(), embeddings, steps
    yield "depthwise-cnn-32x32", DepthwiseCNNClassifier, synthetic(big + 2, 64, (3, 32, 32), 10), {}, big
    mlp = partial(MLPClassifier, in_features=1024, hidden=(1024, 1024))
    yield "mlp-w1024-b256", mlp, synthetic(big + 2, 256, (1024,), 10), {}, big
    cnn = partial(CNNClassifier, image_size=28, channels=(32, 64))
    yield "cnn-28x28-b128", cnn, synthetic(big + 2, 128, (1, 28, 28), 10), {}, big
    gpt = partial(GPTLanguageModel, vocab_size=256, context=64, width=256, depth=2, heads=8)
    yield "gpt-w256-4k-tokens", gpt, synthetic(big + 2, 64, (64,), 256, tokens=True), embeddings, big
    if device.type == "cuda" and not quick:
        gpt512 = partial(GPTLanguageModel, vocab_size=256, context=256, width=512, depth=8, heads=8)
        yield "gpt-w512-d8-s256", gpt512, synthetic(62, 32, (256,), 256, tokens=True), embeddings, 60
        try:
            ResNet18Classifier()
        except ImportError:
            return
        yield "resnet18-synthetic32", ResNet18Classifier, synthetic(62, 256, (3, 32, 32), 10), {}, 60


def time_steps(model_factory, data, device, callback, steps: int) -> tuple[float, LowRankKFACCallback | None]:
    torch.manual_seed(0)
    timer = StepTimer()
    trainer = quiet_trainer(
        accelerator=device.type, max_steps=steps, callbacks=[timer] + ([callback] if callback else [])
    )
    trainer.fit(model_factory(), data)
    return statistics.median(timer.seconds[max(2, steps // 4) :]), callback  # the first steps are warm-up


def rows_per_step(model: nn.Module, layers, data) -> dict[str, int]:
    """n of every handled layer: rows of statistics one training batch gives (all calls of the module)."""
    counts: dict[str, int] = {}

    def hook(name, out_dim):
        def record(module, args, output):
            counts[name] = counts.get(name, 0) + output.numel() // out_dim

        return record

    handles = [
        layer.module.register_forward_hook(hook(layer.name, layer.out_dim * getattr(layer, "groups", 1)))
        for layer in layers
    ]
    loader = data if isinstance(data, torch.utils.data.DataLoader) else _train_loader(data)
    x, _ = next(iter(loader))
    with torch.no_grad():
        model(x.to(next(model.parameters()).device))
    for handle in handles:
        handle.remove()
    return counts


def _train_loader(datamodule):
    datamodule.setup("fit")
    return datamodule.train_dataloader()


def _width(factor: KroneckerFactor) -> int:
    if isinstance(factor, DenseFactor):
        return factor.dim
    return 1 if isinstance(factor, DiagonalFactor) else factor.rank


def _statistics_flops(factor: KroneckerFactor, n: int) -> float:
    if isinstance(factor, DenseFactor):
        return 2.0 * n * factor.dim**2 * factor.groups
    if isinstance(factor, DiagonalFactor):
        return float(n * factor.dim)
    return 4.0 * n * factor.dim * factor.test.shape[1]


def _refresh_flops(factor: KroneckerFactor) -> float:
    if isinstance(factor, DenseFactor):
        return 10.0 * factor.dim**3 * factor.groups
    if isinstance(factor, DiagonalFactor):
        return 0.0
    return 10.0 * factor.dim * factor.test.shape[1] ** 2


def flop_model(model: nn.Module, callback: LowRankKFACCallback, data) -> dict[str, float]:
    """SGD flops of the handled layers and the curvature flops per step, from the formulas above."""
    engine = callback.engine
    n_rows = rows_per_step(model, engine.layers, data)
    sgd = curvature = 0.0
    for layer in engine.layers:
        n, (a_factor, b_factor) = n_rows.get(layer.name, 0), layer.factors
        blocks = getattr(layer, "groups", 1)
        d_in, d_out = layer.in_dim - int(layer.augment), layer.out_dim
        # An embedding's forward and backward are a gather and a scatter-add, not a matmul.
        sgd += 2.0 * n * d_out if isinstance(layer, EmbeddingLayer) else 6.0 * n * d_in * d_out * blocks
        curvature += 4.0 * layer.in_dim * d_out * (_width(a_factor) + _width(b_factor)) * blocks
        curvature += _statistics_flops(a_factor, n) + _statistics_flops(b_factor, n)
        unfolds = isinstance(layer, ConvLayer) and not isinstance(
            a_factor, LowRankFactor
        )  # low-rank: sketched by convs
        curvature += float(n * layer.in_dim * blocks) if unfolds else 0.0
        curvature += (_refresh_flops(a_factor) + _refresh_flops(b_factor)) / engine.options.basis_update_interval
    return {"sgd_gflop": sgd / 1e9, "curvature_gflop": curvature / 1e9, "model_ratio": 1.0 + curvature / sgd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    parser.add_argument(
        "--ranks", nargs="+", type=int, default=list(RANKS), help="ranks to time (default: %(default)s)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name, model_factory, data, options, steps in cases(device, args.quick):
        if args.only and name not in args.only:
            continue
        # Interleave the arms so that drifts in machine load hit all of them.
        sgd: list[float] = []
        kfac: dict[int, list[float]] = {rank: [] for rank in args.ranks}
        callbacks: dict[int, LowRankKFACCallback] = {}
        for _ in range(2 if args.quick else 3):
            sgd.append(time_steps(model_factory, data, device, None, steps)[0])
            for rank in args.ranks:
                callback = LowRankKFACCallback(rank=rank, log_stats=False, **options)
                kfac[rank].append(time_steps(model_factory, data, device, callback, steps)[0])
                callbacks[rank] = callback
        for rank in args.ranks:
            row = {"model": name, "rank": rank, "sgd_ms": 1e3 * statistics.median(sgd)}
            row["kfac_ms"] = 1e3 * statistics.median(kfac[rank])
            row["ratio"] = row["kfac_ms"] / row["sgd_ms"]
            row.update(flop_model(callbacks[rank].engine.model, callbacks[rank], data))
            row["overhead"] = row["ratio"] - row["model_ratio"]
            rows.append(row)
            print_table([row], list(row))
    print("\nstep time (median over steps and repeats), flop-model ratio, and overhead = measured − model:")
    print_table(rows, list(rows[0]))
    write_json("step_overhead", {**device_record(device), "ranks": args.ranks, "quick": args.quick}, rows)
    plt = pyplot()
    if plt is not None:
        figure, ax = plt.subplots(figsize=(10, 3.8))
        positions = range(len(rows))
        ax.bar([p - 0.2 for p in positions], [r["ratio"] for r in rows], width=0.4, label="measured")
        ax.bar([p + 0.2 for p in positions], [r["model_ratio"] for r in rows], width=0.4, label="flop model")
        ax.set_xticks(list(positions), [f"{r['model']} k={r['rank']}" for r in rows], rotation=30, ha="right")
        ax.set(ylabel="step time / SGD step time", title=f"callback step cost ({device_record(device)['device']})")
        ax.legend()
        figure.tight_layout()
        figure.savefig(RESULTS / "step_overhead.png", dpi=120)


if __name__ == "__main__":
    main()
