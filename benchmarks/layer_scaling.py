"""Cost of one curvature update + basis refresh + preconditioning for one Linear layer,
low-rank vs dense (this package's exact mode, and asdl's KfacGradientMaker), measured side by side;
plus the bytes of curvature state and, on CUDA, the peak memory of the step.

    python -m benchmarks.layer_scaling [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

from lightning_lrkfac import LowRankKFAC
from lightning_lrkfac.layers import KFACLayer

from .common import RESULTS, device_record, median_seconds, pyplot, write_json
from .dense_kfac import import_asdl


def state_bytes(layer: KFACLayer) -> int:
    """Bytes of every storage the two factors hold (state, pending sums, eigenpairs); views count once."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for f in layer.factors
        for t in vars(f).values()
        if isinstance(t, torch.Tensor)
    }
    return sum(storages.values())


def one_step(kfac: LowRankKFAC, a_rows: torch.Tensor, g_rows: torch.Tensor, grad: torch.Tensor) -> None:
    """One engine step that updates the factors, refreshes the bases and preconditions (every step)."""
    layer = kfac.layers[0]
    layer.weight.grad.copy_(grad)  # the engine preconditions .grad in place: start from the same gradient
    layer.accumulate([a_rows], [g_rows], lambda examples: 1.0)  # rows as the capture hands them over
    kfac.step()


def measure(dim: int, rank: int, batch: int, device: torch.device, repeats: int) -> dict[str, float]:
    linear = torch.nn.Linear(dim, dim, bias=False).to(device)
    linear.weight.grad = torch.zeros_like(linear.weight)
    kfac = LowRankKFAC(torch.nn.Sequential(linear), rank=rank, kl_clip=None, basis_update_interval=1)
    kfac.build()
    a_rows, g_rows = torch.randn(batch, dim, device=device), torch.randn(batch, dim, device=device)
    grad = torch.randn(dim, dim, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    seconds = median_seconds(lambda: one_step(kfac, a_rows, g_rows, grad), device, repeats)
    # Peak memory above what was allocated before the step (CUDA only; the CPU allocator is not tracked).
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    return {"seconds": seconds, "state_bytes": state_bytes(kfac.layers[0]), "peak_bytes": peak}


def asdl_seconds(dim: int, batch: int, device: torch.device, repeats: int) -> float | None:
    """asdl's dense K-FAC (KfacGradientMaker, curvature and inverse every step) on the same layer:
    its forward_and_backward time minus a plain forward/backward, median of repeats."""
    try:
        asdl = import_asdl()
    except ImportError:
        return None
    model = torch.nn.Sequential(torch.nn.Linear(dim, dim, bias=False)).to(device)
    x, y = torch.randn(batch, dim, device=device), torch.randint(0, dim, (batch,), device=device)
    config = asdl.PreconditioningConfig(damping=1e-3, data_size=batch)
    maker = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp", loss_type="cross_entropy")

    def kfac_step() -> None:
        out = maker.setup_model_call(model, x)
        maker.setup_loss_call(torch.nn.functional.cross_entropy, out, y)
        maker.forward_and_backward()

    def plain_step() -> None:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    return max(median_seconds(kfac_step, device, repeats) - median_seconds(plain_step, device, repeats), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="d ≤ 4096, k ∈ {16, 32}, 3 repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dims", type=int, nargs="*", help="layer widths (default: 512…4096, and 8192 on CUDA)")
    parser.add_argument("--ranks", type=int, nargs="*", help="ranks k (default: 16, 32 quick; 8…64 otherwise)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dims = args.dims or [512, 1024, 2048, 4096] + ([] if args.quick or device.type == "cpu" else [8192])
    ranks = args.ranks or ([16, 32] if args.quick else [8, 16, 32, 64])
    repeats, batch = (3, 128) if args.quick else (7, 256)
    rows = []
    for dim in dims:
        dense_repeats = max(1, repeats // 3) if dim >= 4096 else repeats
        dense = measure(dim, dim, batch, device, dense_repeats)
        asdl_s = asdl_seconds(dim, batch, device, dense_repeats)
        for rank in ranks:
            low = measure(dim, rank, batch, device, repeats)
            rows.append(
                {
                    "d": dim,
                    "k": rank,
                    "lowrank_s": low["seconds"],
                    "dense_s": dense["seconds"],
                    "asdl_dense_s": asdl_s,
                    "speedup_vs_asdl": None if asdl_s is None else asdl_s / low["seconds"],
                    "lowrank_peak_bytes": low["peak_bytes"],
                    "dense_peak_bytes": dense["peak_bytes"],
                    "speedup": dense["seconds"] / low["seconds"],
                    "lowrank_bytes": low["state_bytes"],
                    "dense_bytes": dense["state_bytes"],
                    "memory_ratio": dense["state_bytes"] / low["state_bytes"],
                }
            )
            r = rows[-1]
            print(
                f"d={dim:5d} k={rank:3d}  low-rank {1e3 * r['lowrank_s']:9.2f} ms  dense {1e3 * r['dense_s']:10.2f} ms  speed-up {r['speedup']:7.1f}x  asdl {1e3 * (asdl_s or 0):9.1f} ms ({r['speedup_vs_asdl'] or 0:.0f}x)  state {r['lowrank_bytes'] / 2**20:7.2f} MiB vs {r['dense_bytes'] / 2**20:8.2f} MiB ({r['memory_ratio']:.0f}x)",
                flush=True,
            )
    meta = {**device_record(device), "batch": batch}
    write_json("layer_scaling", meta, rows)
    plt = pyplot()
    if plt is None:
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
