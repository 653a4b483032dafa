"""Muon for the hidden matrices and AdamW for everything else, as one optimizer (Lightning's automatic optimization
takes one): the configuration torch's Muon documentation recommends for transformers."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on ``matrices`` (2-D hidden weights), ``torch.optim.AdamW`` on ``others``.

    One optimizer to Lightning (automatic optimization, gradient clipping, accumulation and checkpoints work
    unchanged): its ``param_groups`` are the Muon group followed by the AdamW group, the same dicts the two inner
    optimizers step with, so learning-rate schedulers reach both; ``state`` is shared too.
    """

    def __init__(
        self,
        matrices: Iterable[Tensor],
        others: Iterable[Tensor],
        lr: float = 0.02,
        adamw_lr: float = 3e-3,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        matrices, others = list(matrices), list(others)
        if not matrices or any(p.dim() != 2 for p in matrices):
            raise ValueError("MuonWithAdamW: `matrices` must be a non-empty list of 2-D parameters (Muon's)")
        groups = [{"params": matrices}, {"params": others}] if others else [{"params": matrices}]
        super().__init__(groups, {})
        self.muon = torch.optim.Muon(groups[:1], lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.adamw = (
            torch.optim.AdamW(groups[1:], lr=adamw_lr, betas=adamw_betas, weight_decay=weight_decay) if others else None
        )
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (after a load replaced them)."""
        self.muon.param_groups, self.muon.state = self.param_groups[:1], self.state
        if self.adamw is not None:
            self.adamw.param_groups, self.adamw.state = self.param_groups[1:], self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()
