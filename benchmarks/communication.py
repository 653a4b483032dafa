"""Bytes each rank communicates per step for the curvature under DDP, for a ResNet-18 layer set:
the callback's sketches (counted from its own pending tensors) vs an all-reduce of dense factors.

    python -m benchmarks.communication
"""

from __future__ import annotations

import argparse

from torch import nn

from lightning_lrkfac import LowRankKFAC

from .common import RESULTS, print_table, pyplot, write_json

FLOAT32 = 4


def resnet18_layers(num_classes: int = 1000) -> list[tuple[str, nn.Module]]:
    """The 21 Conv2d/Linear layers of torchvision's ResNet-18 (same shapes; built without torchvision)."""
    layers: list[tuple[str, nn.Module]] = [("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False))]
    channels = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if block == 0 and stage > 1 else 1
            prefix = f"layer{stage}.{block}"
            layers.append((f"{prefix}.conv1", nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False)))
            layers.append((f"{prefix}.conv2", nn.Conv2d(width, width, 3, padding=1, bias=False)))
            if stride != 1 or channels != width:
                layers.append((f"{prefix}.downsample.0", nn.Conv2d(channels, width, 1, stride=stride, bias=False)))
            channels = width
    layers.append(("fc", nn.Linear(512, num_classes)))
    return layers


def per_step_bytes(rank: int, oversampling: int = 8) -> dict[str, float]:
    """Bytes of one step's statistics all-reduce, and of what layerwise work broadcasts."""
    statistics = dense = gradients = bases = 0
    kfac = LowRankKFAC(
        nn.Sequential(*(module for _, module in resnet18_layers())), rank=rank, oversampling=oversampling
    )
    kfac.build()
    for layer in kfac.layers:
        statistics += sum(t.numel() for f in layer.factors for t in f.pending_tensors()) * FLOAT32
        dense += (layer.in_dim**2 + layer.out_dim**2) * FLOAT32
        gradients += layer.in_dim * layer.out_dim * FLOAT32
        bases += sum(t.numel() for f in layer.factors for t in f.basis_tensors()) * FLOAT32
    return {
        "k": rank,
        "statistics_MB": statistics / 1e6,
        "dense_factors_MB": dense / 1e6,
        "reduction": dense / statistics,
        "layerwise_bases_MB_per_refresh": bases / 1e6,
        "layerwise_gradients_MB": gradients / 1e6,
        "ddp_gradient_allreduce_MB": gradients / 1e6,
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    rows = [per_step_bytes(rank) for rank in (8, 16, 32, 64)]
    print("ResNet-18 (ImageNet shapes, 21 layers), float32, bytes each rank puts into the collectives per step:")
    print_table(rows, list(rows[0]))
    write_json("communication", {"model": "resnet18 layer set", "dtype": "float32"}, rows)
    plt = pyplot()
    if plt is None:
        return
    figure, ax = plt.subplots(figsize=(6, 4))
    ks = [r["k"] for r in rows]
    ax.plot(ks, [r["statistics_MB"] for r in rows], marker="o", label="low-rank sketches (this callback)")
    ax.plot(ks, [r["dense_factors_MB"] for r in rows], marker="s", label="dense factors all-reduce")
    ax.plot(ks, [r["ddp_gradient_allreduce_MB"] for r in rows], ls="--", label="DDP's own gradient all-reduce")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="rank k",
        ylabel="MB per step per rank",
        title="ResNet-18 curvature communication",
    )
    ax.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "communication.png", dpi=120)


if __name__ == "__main__":
    main()
