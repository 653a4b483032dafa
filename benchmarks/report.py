"""The Markdown tables of the README and docs/benchmarks.md, made from the latest JSON in benchmarks/results/.

``python -m benchmarks.report`` prints every table; paste them after a benchmark run. tests/test_docs.py checks
that each one stands in its page unchanged, so no figure in the docs can drift from the latest run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _rows(name: str) -> list[dict[str, Any]]:
    """The summary rows of a result file (not its grid, curve or run entries)."""
    return [row for row in load(name)["rows"] if not ({"grid", "curves"} & set(row))]


def _number(value: float, digits: int = 2) -> str:
    return "never" if not math.isfinite(value) else f"{value:.{digits}f}"


def _steps(value: float) -> str:
    return "never" if not math.isfinite(value) else f"{value:.0f}"


def _ratio(value: float) -> str:
    """A ratio to a baseline, in bold where the callback is faster (below 1)."""
    text = f"{_number(value)}×"
    return f"**{text}**" if value < 1 else text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def language_model_table() -> str:
    """Steps and wall time to the target validation loss, per batch size, each method at its best grid point."""
    rows = []
    for row in _rows("language_model"):
        rows.append(
            [
                f"{row['tokens/step']:,}",
                f"`{row['method']}`" if row["method"] in ("kfac", "ekfac", "soap", "kfac-plain-tie") else row["method"],
                f"{row['lr']:g}",
                f"{row['reached']}",
                _steps(row["steps"]),
                _number(row["seconds"], 1),
                f"{row['ms/step']:.0f}",
                _number(row["steps / better of AdamW, Muon"]),
                _number(row["time / AdamW"]),
                _number(row["time / Muon"]),
                f"{row['final loss']:.2f}",
            ]
        )
    header = [
        "tokens/step", "method", "lr", "seeds reached", "steps", "seconds", "ms/step", "steps / better of AdamW, Muon",
        "time / AdamW", "time / Muon", "final val. loss",
    ]  # fmt: skip
    return _table(header, rows)


def step_overhead_table() -> str:
    """Step time against SGD: measured ratio, the flop model's ratio and their difference, at ranks 16 and 32."""
    by_model: dict[str, dict[int, dict[str, Any]]] = {}
    for row in _rows("step_overhead"):
        by_model.setdefault(row["model"], {})[row["rank"]] = row
    rows = []
    for model, ranks in by_model.items():
        low, high = ranks[16], ranks[32]
        rows.append(
            [
                model,
                f"{low['sgd_ms']:.3g}",
                f"{low['kfac_ms']:.3g} / {low['ratio']:.2f} / {low['model_ratio']:.2f} / {low['overhead']:.2f}",
                f"{high['ratio']:.2f} / {high['model_ratio']:.2f} / {high['overhead']:.2f}",
            ]
        )
    header = ["case", "SGD ms", "k=16: ms / ratio / flop model / overhead", "k=32: ratio / flop model / overhead"]
    return _table(header, rows)


def time_to_accuracy_table() -> str:
    """Steps and seconds to the target test accuracy, best grid point, median of the seeds."""
    rows = []
    for row in _rows("time_to_accuracy"):
        rows.append(
            [
                row["task"],
                f"{row['target']:.0%}",
                row["method"],
                row["config"],
                _steps(row["median_steps"]),
                _number(row["median_seconds"]),
                f"{row['ms_per_step']:.1f}",
            ]
        )
    return _table(["task", "target", "method", "best grid point", "steps", "seconds", "ms/step"], rows)


def layer_scaling_table() -> str:
    """One engine step (update, refresh, precondition) and the curvature state against exact mode and asdl."""
    rows = []
    for row in _rows("layer_scaling"):
        rows.append(
            [
                f"{row['d']}",
                f"{row['k']}",
                f"{1e3 * row['lowrank_s']:.1f}",
                f"{1e3 * row['dense_s']:.0f}",
                f"{row['speedup']:.0f}×",
                f"{1e3 * row['asdl_dense_s']:.0f}",
                f"{row['speedup_vs_asdl']:.0f}×",
                f"{row['memory_ratio']:.0f}×",
            ]
        )
    header = ["d", "k", "low-rank ms", "exact ms", "speed-up", "asdl ms", "vs asdl", "state: exact / low-rank"]
    return _table(header, rows)


def approximation_table() -> str:
    """Cosine between the shipped low-rank direction and exact K-FAC in a running training, beside top-k truncation."""
    rows = [
        [f"{row['damping']:g}", f"{row['k']}", f"{row['shipped']:.3f}", f"{row['truncation']:.3f}", f"{row['gap']:.4f}"]
        for row in _rows("approximation")
    ]
    return _table(["λ", "k", "cosine to exact K-FAC", "top-k truncation of the same factors", "gap"], rows)


MLP_TASKS = {
    "digits": "digits MLP (width 256), batch 64",
    "mnist1d": "mnist1d MLP (width 256), batch 128",
    "mnist1d-w1024": "mnist1d MLP (width 1024), batch 128",
}


def readme_table() -> str:
    """The README's one table: where the callback wins wall time and where it does not, from the latest runs."""
    rows = []
    for row in _rows("time_to_accuracy"):
        if row["method"] != "kfac":
            continue
        baselines = [
            r for r in _rows("time_to_accuracy") if r["task"] == row["task"] and r["method"] in ("sgd", "adam")
        ]
        steps = row["median_steps"] / min(b["median_steps"] for b in baselines)
        rows.append(
            [
                f"{MLP_TASKS[row['task']]}, {row['target']:.0%} test acc.",
                "better of SGD, Adam",
                f"{steps:.2f}×",
                _ratio(row["time_vs_best_baseline"]),
            ]
        )
    lm = {(r["tokens/step"], r["method"]): r for r in _rows("language_model")}
    for tokens in sorted({t for t, _ in lm}):
        row = lm[(tokens, "kfac")]
        target = load("language_model")["meta"]["target"]
        for peer, key in (("AdamW", "adamw"), ("Muon", "muon")):
            peer_row = lm[(tokens, key)]
            rows.append(
                [
                    f"byte GPT on Python docs, {tokens:,} tokens/step, val. loss {target}",
                    f"tuned {peer}",
                    f"{_number(row['steps'] / peer_row['steps'])}×",
                    _ratio(row["seconds"] / peer_row["seconds"]),
                ]
            )
    return _table(["task", "against", "steps", "wall time"], rows)


def main_job_sentence() -> str:
    """The main job's result as the README states it (``python -m benchmarks.main_job``)."""
    rows = {row["arm"]: row for row in _rows("main_job")}
    mine, twin = rows["callback"], rows["SGD twin"]
    repeats = load("main_job")["meta"]["repeats"]
    return (
        f"test accuracy {mine['median_test_accuracy']:.1%} in {mine['median_fit_seconds']:.1f} s of fitting, against "
        f"{twin['median_test_accuracy']:.1%} in {twin['median_fit_seconds']:.1f} s for its SGD twin (median of "
        f"{repeats} alternating runs on 2 CPU cores)"
    )


TABLES: dict[str, Callable[[], str]] = {
    "README.md": readme_table,
    "README.md#main-job": main_job_sentence,
    "docs/benchmarks.md#language-model": language_model_table,
    "docs/benchmarks.md#step-cost": step_overhead_table,
    "docs/benchmarks.md#time-to-accuracy": time_to_accuracy_table,
    "docs/benchmarks.md#layer-scaling": layer_scaling_table,
    "docs/benchmarks.md#approximation-quality": approximation_table,
}


def main() -> None:
    for where, table in TABLES.items():
        print(f"\n{where}\n\n{table()}")


if __name__ == "__main__":
    main()
