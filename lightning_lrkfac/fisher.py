"""Monte-Carlo Fisher: a loss on labels sampled from the model's own predictive distribution.

Its gradient w.r.t. the layer outputs has covariance equal, in expectation, to the true
Fisher's factor B (Martens & Grosse 2015, §5), unlike the empirical Fisher, which uses
the training labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LIKELIHOODS = ("categorical", "gaussian")


def sampled_negative_log_likelihood(outputs: Tensor, likelihood: str, generator: torch.Generator) -> Tensor:
    """Σ over examples of −log p(ŷ | outputs) with ŷ drawn from p(· | outputs), computed in float32.

    ``categorical``: ``outputs`` are logits with classes in the last dimension (any leading
    shape: batch, sequence, …). ``gaussian``: ``outputs`` are means of N(·, I), so the
    gradient is the sampled noise. Reduced by a sum, so each example's gradient is its own.
    """
    outputs = outputs.float()
    if likelihood == "categorical":
        logits = outputs.reshape(-1, outputs.shape[-1])
        with torch.no_grad():
            probabilities = torch.softmax(logits, dim=-1)
            # Non-finite logits (a diverged step) give NaN statistics, which the fold skips; sampling must not raise.
            finite = probabilities.isfinite().all(-1, keepdim=True) & (probabilities >= 0).all(-1, keepdim=True)
            probabilities = torch.where(finite, probabilities, torch.ones_like(probabilities))
            labels = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        return F.cross_entropy(logits, labels, reduction="sum")
    if likelihood == "gaussian":
        noise = torch.randn(outputs.shape, generator=generator, device=outputs.device, dtype=outputs.dtype)
        targets = outputs.detach() + noise
        return 0.5 * (outputs - targets).square().sum()
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
