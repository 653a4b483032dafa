"""Cost of one curvature update + basis refresh + preconditioning for one Linear layer,
low-rank vs dense (exact mode), measured side by side; plus the bytes of curvature state.

    python -m benchmarks.layer_scaling [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lightning_lrkfac.layers import KFACLayer

RESULTS = Path(__file__).resolve().parent / "results"


def state_bytes(layer: KFACLayer) -> int:
    """Bytes of every storage the two factors hold (state, pending sums, eigenpairs); views count once."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for f in layer.factors
        for t in vars(f).values()
        if isinstance(t, torch.Tensor)
    }
    return sum(storages.values())


def one_step(layer: KFACLayer, a_rows: torch.Tensor, g_rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    a_factor, b_factor = layer.factors
    a_factor.accumulate(a_rows, 1.0 / a_rows.shape[0])
    b_factor.accumulate(g_rows, 1.0 / g_rows.shape[0])
    valid = torch.ones((), dtype=torch.bool, device=grad.device)
    a_factor.fold(0.95, valid)
    b_factor.fold(0.95, valid)
    a_factor.refresh()
    b_factor.refresh()
    layer.prepare_inverses(1e-3)
    return layer.precondition([grad])[0]


def measure(dim: int, rank: int, batch: int, device: torch.device, repeats: int) -> dict[str, float]:
    linear = torch.nn.Linear(dim, dim, bias=False).to(device)
    layer = KFACLayer("layer", linear, bias_mode="augment")
    layer.build_factors(rank, 8, 0, False, torch.Generator().manual_seed(0), torch.float32)
    a_rows, g_rows = torch.randn(batch, dim, device=device), torch.randn(batch, dim, device=device)
    grad = torch.randn(dim, dim, device=device)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        one_step(layer, a_rows, g_rows, grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call is warm-up
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "state_bytes": state_bytes(layer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="d ≤ 4096, k ∈ {16, 32}, 3 repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dims = [512, 1024, 2048, 4096] + ([] if args.quick or device.type == "cpu" else [8192])
    ranks = [16, 32] if args.quick else [8, 16, 32, 64]
    repeats, batch = (3, 128) if args.quick else (7, 256)
    rows = []
    for dim in dims:
        dense = measure(dim, dim, batch, device, max(1, repeats // 3) if dim >= 4096 else repeats)
        for rank in ranks:
            low = measure(dim, rank, batch, device, repeats)
            rows.append(
                {
                    "d": dim,
                    "k": rank,
                    "lowrank_s": low["seconds"],
                    "dense_s": dense["seconds"],
                    "speedup": dense["seconds"] / low["seconds"],
                    "lowrank_bytes": low["state_bytes"],
                    "dense_bytes": dense["state_bytes"],
                    "memory_ratio": dense["state_bytes"] / low["state_bytes"],
                }
            )
            r = rows[-1]
            print(
                f"d={dim:5d} k={rank:3d}  low-rank {1e3 * r['lowrank_s']:9.2f} ms  dense {1e3 * r['dense_s']:10.2f} ms  speed-up {r['speedup']:7.1f}x  state {r['lowrank_bytes'] / 2**20:7.2f} MiB vs {r['dense_bytes'] / 2**20:8.2f} MiB ({r['memory_ratio']:.0f}x)",
                flush=True,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": batch,
    }
    (RESULTS / "layer_scaling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for rank in ranks:
        sel = [r for r in rows if r["k"] == rank]
        axes[0].plot([r["d"] for r in sel], [r["speedup"] for r in sel], marker="o", label=f"k={rank}")
        axes[1].plot([r["d"] for r in sel], [r["memory_ratio"] for r in sel], marker="o", label=f"k={rank}")
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="layer width d",
        ylabel="dense time / low-rank time",
        title=f"one update+refresh+precondition ({meta['device']})",
    )
    axes[1].set(xscale="log", yscale="log", xlabel="layer width d", ylabel="dense state / low-rank state")
    for ax in axes:
        ax.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "layer_scaling.png", dpi=120)


if __name__ == "__main__":
    main()
