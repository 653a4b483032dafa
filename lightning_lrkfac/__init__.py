"""lightning-lrkfac: low-rank K-FAC natural-gradient descent for PyTorch, and a Lightning callback for it.

``LowRankKFAC`` (the engine) works in any PyTorch loop and imports nothing from Lightning;
``LowRankKFACCallback`` plugs it into a ``pl.Trainer`` and is imported only when asked for.
"""

from __future__ import annotations

from typing import Any

from .engine import LowRankKFAC
from .options import KFACOptions

__all__ = ["KFACOptions", "LowRankKFAC", "LowRankKFACCallback"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the Lightning callback on first use, so that plain-PyTorch users never import Lightning."""
    if name == "LowRankKFACCallback":
        from .callback import LowRankKFACCallback

        return LowRankKFACCallback
    raise AttributeError(f"module 'lightning_lrkfac' has no attribute {name!r}")
