"""The package's layering is a contract (pyproject's import-linter section): no import cycles, type-checking
imports included, and no module importing one above it. A new circle fails here, not in review."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(ROOT)  # lint-imports reads pyproject.toml from the working directory
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0, "run `lint-imports`"
