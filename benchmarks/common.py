"""Shared by the benchmark scripts: timing (warm-up, CUDA sync, median), device record, output files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: Where scripts write JSON and PNG; ``LRKFAC_RESULTS_DIR`` redirects them (``--gpu`` uses results/gpu/).
RESULTS = Path(os.environ.get("LRKFAC_RESULTS_DIR", Path(__file__).resolve().parent / "results"))


def device_record(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark, for the JSON: device name, torch version, CPU threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads()}


def median_seconds(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``function`` over ``repeats`` calls after ``warmup`` calls, CUDA-synchronised."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_json(name: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return path


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as an aligned text table (floats with 4 significant digits)."""

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)), flush=True)


def plot_runs(axes: Any, column: int, histories: dict[str, list[list[tuple[int, float, float]]]]) -> None:
    """Each method's runs, (step, training seconds, metric) per check, as curves against steps (``axes[0, column]``)
    and against wall time (``axes[1, column]``), one colour per method."""
    for index, (name, runs) in enumerate(histories.items()):
        for seed, history in enumerate(runs):
            steps, seconds, value = zip(*history)
            legend = name if seed == 0 else None
            axes[0, column].plot(steps, value, color=f"C{index}", alpha=0.7, label=legend)
            axes[1, column].plot(seconds, value, color=f"C{index}", alpha=0.7, label=legend)
