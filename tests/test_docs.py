"""The README and docs/ stay true: every Python snippet runs, every relative link resolves, and every results
table is the one benchmarks/report.py makes from the latest JSON in benchmarks/results/."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def snippets(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def test_every_page_is_checked():
    assert {p.name for p in PAGES} >= {
        "README.md", "options.md", "how-it-works.md", "distributed.md", "step-rules.md", "coverage.md",
        "failure-behaviour.md", "benchmarks.md",
    }  # fmt: skip


@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p, "python")], ids=lambda p: p.name)
def test_python_snippets_run(page, tmp_path, monkeypatch):
    """A page's snippets run in order in one namespace (a later one may use what an earlier one made)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__snippet__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for index, code in enumerate(snippets(page, "python")):
                exec(compile(code, f"{page.name}:snippet {index + 1}", "exec"), namespace)
        finally:  # a snippet under a distributed strategy leaves its one-process group behind
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to {target} does not resolve"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{page.name}: no heading #{anchor} in {resolved.name}"


@pytest.mark.parametrize("where", list(report.TABLES))
def test_results_tables_come_from_the_latest_json(where):
    page = where.partition("#")[0]
    assert report.TABLES[where]() in (ROOT / page).read_text(), (
        f"{page}: paste the table from `python -m benchmarks.report` ({where})"
    )


def test_ci_runs_the_readme_test_command():
    commands = [line for body in snippets(ROOT / "README.md", "bash") for line in body.splitlines() if line.strip()]
    assert len(commands) == 2, commands  # install + main job; install + tests
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci/run").read_text()
    assert test_command.split("&&")[-1].strip().replace("pytest", "python3 -m pytest") in ci
