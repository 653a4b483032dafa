"""The Markdown tables of the README and docs/benchmarks.md, made from the latest JSON in benchmarks/results/.

``python -m benchmarks.report`` prints every table; paste them after a benchmark run. tests/test_docs.py checks
that each one stands in its page unchanged, so no figure in the docs can drift from the latest run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from .common import RESULTS  # honours LRKFAC_RESULTS_DIR, as the scripts that write the files do


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _rows(name: str) -> list[dict[str, Any]]:
    """The summary rows of a result file (not its grid, curve or run entries)."""
    return [row for row in load(name)["rows"] if not ({"grid", "curves"} & set(row))]


def _number(value: float, digits: int = 2) -> str:
    return "never" if not math.isfinite(value) else f"{value:.{digits}f}"


def _steps(value: float) -> str:
    return "never" if not math.isfinite(value) else f"{value:.0f}"


def _milliseconds(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def _ratio(value: float) -> str:
    """A ratio to a baseline, in bold where the callback is faster (below 1)."""
    text = f"{_number(value)}×"
    return f"**{text}**" if value < 1 else text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


#: The language-model methods that are the callback's (shown as code).
CALLBACK_METHODS = (
    "kfac",
    "ekfac",
    "soap",
    "kfac-plain-tie",
    "normalized",
    "normalized-tie",
    "normalized-rms",
    "normalized-capped",
    "normalized-lean",
    "normalized-polar",
    "normalized-default",
)


def _language_model_rows(name: str = "language_model") -> dict[tuple[int, str, str], dict[str, Any]]:
    """(tokens per step, method, target name) → its summary row (harness schema) at the method's best point."""
    return {(row["tokens"], row["method"], row["target"]): row for row in _rows(name)}


def language_model_table(name: str = "language_model") -> str:
    """Steps to each target validation loss per batch size and method (its best point for the deepest target), with
    the deepest target's steps and wall time against tuned Muon's, and AdamW's where it ran (``name``: the result
    file, one width)."""
    rows = _language_model_rows(name)
    adamw = any(method == "adamw" for _, method, _ in rows)
    lines = []
    for tokens, method, target in rows:
        if target != "deepest":
            continue
        deep = rows[(tokens, method, "deepest")]
        steps = [_steps(rows[(tokens, method, goal)]["steps"]) for goal in ("2.4", "2", "deepest")]
        against = [deep["steps / Muon"], deep["time / Muon"]] + ([deep["time / AdamW"]] if adamw else [])
        lines.append(
            [
                f"{tokens:,}", f"`{method}`" if method in CALLBACK_METHODS else method,
                deep["config"].removeprefix("lr="), f"{deep['reached']}/{deep['seeds']}", *steps, f"{deep['loss']:.3f}",
                _number(deep["seconds"], 1), f"{deep['ms_per_step']:.0f}", *map(_number, against),
                f"{-deep['best']:.3f}",
            ]
        )  # fmt: skip
    header = [
        "tokens/step", "method", "lr", "seeds at the deepest", "steps to 2.4", "to 2.0", "to the deepest",
        "deepest target", "seconds to it", "ms/step", "steps / Muon", "time / Muon", *(["time / AdamW"] if adamw else []),
        "best val. loss",
    ]  # fmt: skip
    return _table(header, lines)


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
                _steps(row["steps"]),
                _number(row["seconds"]),
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


BATCH_TASKS = {
    "mlp": "mnist1d MLP (width 256)",
    "cnn": "mnist1d 1D CNN",
    "lm": "byte GPT on Python docs",
}


#: The batch-scaling methods with a column each: the peers, then each curvature method tuned and at its default.
BATCH_METHODS = ("sgd", "adam", "muon", "kfac", "kfac-default", "normalized", "normalized-default")


def _cell(row: dict[str, Any]) -> str:
    """Steps and seconds to the target of one method, e.g. ``120 / 1.4 s``, or ``never`` within the budget."""
    return f"{_steps(row['steps'])} / {_number(row['seconds'], 1)} s" if math.isfinite(row["steps"]) else "never"


def _against_peers(row: dict[str, Any], key: str, bold: bool = True, reached: str = "baseline reached") -> str:
    """A ratio to the best peer (or the peer whose ``reached`` flag is named); ``<`` where it did not reach the target
    in the budget (the ratio to the budget)."""
    text = _ratio(row[key]) if bold else f"{_number(row[key])}×"
    return text if row[reached] else "< " + text


def _versus(mine: float, theirs: float, budget: float, bold: bool = True) -> str:
    """mine / theirs; "never" when mine did not reach the target; "<" and the ratio to the peer's budget (its steps,
    or its seconds for them) when only the peer did not."""
    if not math.isfinite(mine):
        return "never"
    ratio = mine / (theirs if math.isfinite(theirs) else budget)
    text = _ratio(ratio) if bold else f"{_number(ratio)}×"
    return text if math.isfinite(theirs) else "< " + text


def batch_scaling_table() -> str:
    """Per task and batch size: each method's steps / seconds to the target at its best point (a default method: its
    default), ``kfac`` against the best of SGD, Adam and Muon, ``normalized`` against Muon, and each curvature method's
    untuned default against its tuned point."""
    by_key: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for task in BATCH_TASKS:
        if (RESULTS / f"batch_scaling_{task}.json").exists():
            for row in _rows(f"batch_scaling_{task}"):
                by_key.setdefault((row["task"], row["batch"]), {})[row["method"]] = row
    rows = []
    for (task, batch), methods in by_key.items():
        kfac, normalized = methods["kfac"], methods["normalized"]
        rows.append(
            [
                BATCH_TASKS[task],
                f"{batch:,}",
                *(_cell(methods[m]) for m in BATCH_METHODS),
                f"{_against_peers(kfac, 'steps / baseline', bold=False)} / {_against_peers(kfac, 'time / baseline')}",
                f"{_against_peers(normalized, 'steps / Muon', False, 'Muon reached')} / "
                f"{_against_peers(normalized, 'time / Muon', reached='Muon reached')}",
                " ; ".join(
                    f"{_number(methods[m]['default / tuned steps'])}× / {_number(methods[m]['default / tuned time'])}×"
                    for m in ("kfac", "normalized")
                ),
            ]
        )
    header = [
        "task", "batch", "SGD", "Adam", "Muon", "`kfac` tuned", "`kfac` default", "`normalized` tuned",
        "`normalized` default", "`kfac` vs best peer: steps / time", "`normalized` vs Muon: steps / time",
        "default / tuned, steps / time: `kfac` ; `normalized`",
    ]  # fmt: skip
    return _table(header, rows)


def _seeds_cell(row: dict[str, Any], config: bool = True) -> str:
    """A point's steps / seconds (and its configuration); the seeds that reached the target where some but not all
    did."""
    text = f"{_cell(row)} ({row['config']})" if config else _cell(row)
    return text if row["reached"] in (0, row["seeds"]) else f"{text}, {row['reached']} of {row['seeds']} seeds"


def batch_scaling_damping_table() -> str:
    """π against relative damping per task, batch size and step: each mode's tuned point and its default point, and
    relative over π at the tuned points."""
    cells: dict[tuple[str, int, str], dict[str, dict[str, Any]]] = {}
    for row in load("batch_scaling_damping")["rows"]:
        step, mode = row["method"].split(" ")
        mine = cells.setdefault((row["task"], row["batch"], step), {})
        if row["tuned"]:
            mine[f"{mode} tuned"] = row
        if row["default"]:
            mine[f"{mode} default"] = row
    rows = []
    for (task, batch, step), mine in cells.items():
        pi, relative = mine["pi tuned"], mine["relative tuned"]
        ratio = f"{_versus(relative['steps'], pi['steps'], math.inf, bold=False)} / "
        ratio += _versus(relative["seconds"], pi["seconds"], math.inf)
        default = mine["pi default"]["config"]
        rows.append([BATCH_TASKS[task], f"{batch:,}", f"`{step}`", _seeds_cell(pi), _seeds_cell(relative), ratio,
                     default, _seeds_cell(mine["pi default"], False), _seeds_cell(mine["relative default"], False)])  # fmt: skip
    header = ["task", "batch", "step", "π-damping tuned", "relative tuned", "relative / π tuned: steps / time",
              "default rate", "π at the default rate", "relative at the default rate"]  # fmt: skip
    return _table(header, rows)


def batch_step_cost_table() -> str:
    """Step time with the callback against the batch size, beside the flop model."""
    rows = [
        [
            row["model"],
            f"{row['batch']:,}",
            _milliseconds(row["sgd_ms"]),
            _milliseconds(row["kfac_ms"]),
            f"{row['ratio']:.2f}",
            f"{row['model_ratio']:.2f}",
            f"{row['overhead']:.2f}",
        ]
        for row in _rows("batch_scaling_step_cost")
    ]
    return _table(["model", "batch", "SGD ms", "callback ms", "ratio", "flop model", "overhead"], rows)


def readme_table() -> str:
    """The README's one table: ``kfac`` and ``normalized`` against the same peer per task, where each wins wall time
    and where it does not, from the latest runs."""
    rows = []
    for task in ("mlp", "cnn"):
        target = load(f"batch_scaling_{task}")["meta"]["target"]
        methods: dict[int, dict[str, dict[str, Any]]] = {}
        for row in _rows(f"batch_scaling_{task}"):
            methods.setdefault(row["batch"], {})[row["method"]] = row
        for batch, by_method in methods.items():
            rows.append(
                [
                    f"{BATCH_TASKS[task]}, batch {batch:,}, {target:.0%} test acc.",
                    "best of tuned SGD, Adam, Muon",
                    *(
                        f"{_against_peers(by_method[m], 'steps / baseline', bold=False)} / "
                        f"{_against_peers(by_method[m], 'time / baseline')}"
                        for m in ("kfac", "normalized")
                    ),
                ]
            )
    lm = _language_model_rows()
    budget = load("language_model")["meta"]["budget"]
    for tokens in sorted({t for t, _, _ in lm}):
        for peer, key, target in (("Muon", "muon", "deepest"), ("Muon", "muon", "2"), ("AdamW", "adamw", "2.4")):
            peer_row = lm[(tokens, key, target)]
            cells = []
            for method in ("kfac", "normalized"):
                row = lm[(tokens, method, target)]
                steps = _versus(row["steps"], peer_row["steps"], budget, bold=False)
                seconds = _versus(row["seconds"], peer_row["seconds"], budget * peer_row["ms_per_step"] / 1e3)
                cells.append(f"{steps} / {seconds}")
            loss = lm[(tokens, "normalized", target)]["loss"]
            rows.append(
                [f"byte GPT on Python docs, {tokens:,} tokens/step, val. loss {loss:.2f}", f"tuned {peer}", *cells]
            )
    return _table(["task", "against", "`kfac`: steps / wall time", "`normalized`: steps / wall time"], rows)


def main_job_sentence() -> str:
    """The main job's result as the README states it (``python -m benchmarks.main_job``)."""
    rows = {row["arm"]: row for row in _rows("main_job")}
    mine, twin = rows["callback"], rows["Adam twin"]
    repeats = load("main_job")["meta"]["repeats"]
    return (
        f"95% validation accuracy after {mine['median_steps']:.0f} steps and {mine['median_training_seconds']:.1f} s "
        f"of training (test accuracy {mine['median_test_accuracy']:.1%}), against {twin['median_steps']:.0f} steps "
        f"and {twin['median_training_seconds']:.1f} s (test accuracy {twin['median_test_accuracy']:.1%}) for its "
        f"Adam twin (median of {repeats} alternating runs on 2 CPU cores)"
    )


AUTOMATIC_TASKS = {"digits": "digits", "mnist1d": "mnist1d", "digits-autoencoder": "digits autoencoder (MSE)"}


def automatic_step_table() -> str:
    """Per task and batch size: steps / seconds to the target of each method at its best point and of the automatic
    step at its best λ₀ and its default; the automatic step's cost per step against SGD's, its time against the best
    of tuned SGD, Adam and Muon, and its default's steps against the best tuned method."""
    by_key: dict[tuple[str, int], dict[tuple[str, str], dict[str, Any]]] = {}
    for row in _rows("automatic_step"):
        by_key.setdefault((row["task"], row["batch"]), {})[(row["method"], row["kind"])] = row
    rows = []
    variants = ("auto", "auto-mc")
    for (task, batch), cells in by_key.items():
        tuned = [cells[(m, "tuned")] for m in ("sgd", "adam", "muon", "kfac")]
        automatic = [cells[(m, k)] for m in variants for k in ("tuned", "default")]
        rows.append(
            [
                AUTOMATIC_TASKS[task],
                f"{batch:,}",
                *(_cell(row) for row in tuned + automatic),
                " / ".join(f"{_number(cells[(m, 'tuned')]['step cost / sgd'], 1)}×" for m in variants),
                " / ".join(_ratio(cells[(m, "tuned")]["time / best of sgd, adam, muon"]) for m in variants),
                " / ".join(f"{_number(cells[(m, 'default')]['steps / best tuned'])}×" for m in variants),
            ]
        )
    header = [
        "task", "batch", "SGD", "Adam", "Muon", "`kfac` + SGD", "auto, best λ₀", "auto, default", "auto mc, best λ₀",
        "auto mc, default", "step cost / SGD's (auto / mc)", "best λ₀: time / best of SGD, Adam, Muon (auto / mc)",
        "default: steps / best tuned (auto / mc)",
    ]  # fmt: skip
    return _table(header, rows)


def _megabytes(count: float) -> str:
    return f"{count / 1e6:.2f} MB"


def sharding_bytes_table() -> str:
    """Per width and rank: FSDP2's gradient reduce-scatter, the curvature's bytes per step, and their ratios."""
    rows = [
        [
            f"{row['width']:,}",
            f"{row['rank k']}",
            _megabytes(row["FSDP reduce-scatter bytes"]),
            _megabytes(row["shards bytes"] + row["kl + checks bytes"]),
            f"{100 * row['step / reduce-scatter']:.2f}%",
            f"{100 * row['model k·Σd_in / Σd_out·d_in']:.2f}%",
            _megabytes(row["statistics bytes"]),
            f"{100 * row['statistics / reduce-scatter']:.2f}%",
            f"{100 * row['all / reduce-scatter']:.2f}%",
        ]
        for row in _rows("sharding_bytes")
    ]
    header = [
        "width d", "k", "FSDP2 gradient reduce-scatter", "preconditioning (Wᵀ X, KL clip)", "its share",
        "model 7k / 12d", "statistics (sketches)", "their share", "both, a fold every step",
    ]  # fmt: skip
    return _table(header, rows)


def compile_table() -> str:
    """Step times eager and compiled, with and without the callback (``python -m benchmarks.compile``)."""
    keys = [
        "eager ms", "eager + callback ms", "compiled ms", "compiled + callback ms", "compile speed-up",
        "compile speed-up with the callback", "callback / plain, compiled",
    ]  # fmt: skip
    rows = [[row["model"], *(f"{row[key]:.2f}" if "speed" in key or "/" in key else f"{row[key]:.1f}" for key in keys)]
            for row in _rows("compile")]  # fmt: skip
    return _table(["model", *keys], rows)


def embeddings_table() -> str:
    """Steps / seconds to the target and ms per step with ``precondition_embeddings`` off and on."""
    rows = [
        [f"`{row['method'].split('=')[1].lower()}`", f"{row['reached']} of {row['seeds']}", _cell(row),
         _milliseconds(row["ms_per_step"]), f"{row['final']:.3f}"]
        for row in _rows("embeddings")
    ]  # fmt: skip
    target = load("embeddings")["meta"]["target"]
    header = [
        "`precondition_embeddings`",
        f"seeds reaching {target:.0%}",
        "steps / seconds (median)",
        "ms/step",
        "final",
    ]
    return _table(header, rows)


def _defaults_cell(row: dict[str, Any]) -> str:
    if not math.isfinite(row["steps"]):
        return f"never ({row['reached']} of {row['seeds']} seeds)"
    return f"{_steps(row['steps'])} steps, {_number(row['vs_tuned'])}×"


def _by_method_and_task(name: str) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """A result's summary rows as method → task → row, and the tasks in the order they ran."""
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for row in _rows(name):
        cells.setdefault(row["method"], {})[row["task"]] = row
    return cells, list(next(iter(cells.values())))


def defaults_table() -> str:
    """Per one-option change from the tuned callback configuration: median steps and time to the target relative to
    the tuned configuration, per task."""
    cells, tasks = _by_method_and_task("defaults")
    rows = [[name, *(_defaults_cell(by_task[t]) for t in tasks)] for name, by_task in cells.items()]
    return _table(["change", *(f"{t}: steps, time / tuned" for t in tasks)], rows)


STEP_RULE_METHODS = {
    "sgd": "SGD + momentum", "adam": "Adam", "kfac": "`kfac`", "ekfac": "`ekfac`",
    "kfac-mc": "`kfac`, `fisher_type: mc`", "ekfac-mc": "`ekfac`, `fisher_type: mc`", "soap": "`soap`",
}  # fmt: skip
STEP_RULE_TASKS = {
    "digits": "digits", "mnist1d": "mnist1d", "digits-autoencoder": "digits autoencoder (MSE)",
    "mnist1d-w1024": "mnist1d, width 1024",
}  # fmt: skip


def _step_rule_cell(row: dict[str, Any]) -> str:
    """Steps of the best grid point (its ratio to the better of tuned SGD and Adam) and its time ratio; bold where
    it is faster in wall time; the seeds that reached the target where not all did."""
    if not math.isfinite(row["steps"]):
        return "never"
    text = f"{_steps(row['steps'])} ({_number(row['steps / best baseline'])}×), {_number(row['time / best baseline'])}×"
    text = f"**{text}**" if row["time / best baseline"] < 1 else text
    return text if row["reached"] == row["seeds"] else f"{text} ({row['reached']} of {row['seeds']} seeds)"


def step_rules_table(name: str = "step_rules") -> str:
    """Per method: each task's best grid point against the better of tuned SGD and Adam, and the untuned default's
    time over the tuned one's."""
    cells, tasks = _by_method_and_task(name)
    rows = []
    for method, by_task in cells.items():
        defaults = " / ".join(_number(by_task[t]["default / tuned time"]) for t in tasks)
        rows.append([STEP_RULE_METHODS[method], *(_step_rule_cell(by_task[t]) for t in tasks), defaults])
    header = ["method", *(STEP_RULE_TASKS[t] for t in tasks), "untuned default / tuned, time"]
    return _table(header, rows)


def automatic_profile_table() -> str:
    """The phases of a step (ms) of SGD, the callback's default step and the automatic step, and the step's ratio."""
    keys = ["forward ms", "before_backward ms", "backward ms", "engine step ms", "optimizer ms", "step ms"]
    rows = [
        [f"{row['batch']:,}", f"`{row['method']}`", *(f"{row[key]:.1f}" for key in keys), f"{row['step / sgd']:.1f}×"]
        for row in _rows("automatic_profile")
    ]
    header = ["batch", "method", "forward", "graphs (before_backward)", "backward", "engine step", "optimizer",
              "whole step (mean)", "step / SGD's"]  # fmt: skip
    return _table(header, rows)


def compile_passes_table() -> str:
    """The forward and backward alone (ms) of each arm of ``python -m benchmarks.compile``."""
    arms = ["eager", "eager + callback", "compiled", "compiled + callback"]
    rows = [[row["model"], *(f"{row[f'forward+backward ms: {arm}']:.1f}" for arm in arms)] for row in _rows("compile")]
    return _table(["model", "forward + backward: eager", "eager + callback", "compiled", "compiled + callback"], rows)


TABLES: dict[str, Callable[[], str]] = {
    "README.md": readme_table,
    "README.md#main-job": main_job_sentence,
    "docs/benchmarks.md#batch-scaling": batch_scaling_table,
    "docs/benchmarks.md#damping-mode": batch_scaling_damping_table,
    "docs/benchmarks.md#step-cost-against-the-batch-size": batch_step_cost_table,
    "docs/benchmarks.md#language-model": language_model_table,
    "docs/benchmarks.md#language-model (width 256)": lambda: language_model_table("language_model_w256"),
    "docs/benchmarks.md#language-model (variants)": lambda: language_model_table("language_model_variants"),
    "docs/benchmarks.md#language-model (cost)": lambda: language_model_table("language_model_cost"),
    "docs/benchmarks.md#language-model (polar)": lambda: language_model_table("language_model_polar"),
    "docs/benchmarks.md#step-cost": step_overhead_table,
    "docs/benchmarks.md#time-to-accuracy": time_to_accuracy_table,
    "docs/benchmarks.md#layer-scaling": layer_scaling_table,
    "docs/benchmarks.md#approximation-quality": approximation_table,
    "docs/step-rules.md#step-rules": step_rules_table,
    "docs/step-rules.md#step-rules (wide)": lambda: step_rules_table("step_rules_mnist1d-w1024"),
    "docs/step-rules.md#automatic-step-size": automatic_step_table,
    "docs/step-rules.md#automatic-step-size (profile)": automatic_profile_table,
    "docs/distributed.md#fsdp2": sharding_bytes_table,
    "docs/benchmarks.md#torchcompile": compile_table,
    "docs/benchmarks.md#torchcompile (passes)": compile_passes_table,
    "docs/benchmarks.md#embeddings": embeddings_table,
    "docs/benchmarks.md#defaults": defaults_table,
}


def main() -> None:
    for where, table in TABLES.items():
        print(f"\n{where}\n\n{table()}")


if __name__ == "__main__":
    main()
