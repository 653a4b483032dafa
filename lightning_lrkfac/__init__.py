"""lightning-lrkfac: low-rank K-FAC natural-gradient descent as a PyTorch Lightning callback."""

from .callback import LowRankKFACCallback

__all__ = ["LowRankKFACCallback"]
__version__ = "0.1.0"
