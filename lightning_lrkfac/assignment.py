"""Which rank refreshes and preconditions each layer, and what the others receive (``work_distribution``).

``replicate``: every rank does every layer (the default; nothing is sent but the statistics). ``layerwise``: each
layer has one owner, chosen by a greedy cost balance (:func:`.distributed.balanced_owners`); owners broadcast the
new bases on refresh steps (O(k·d)) and the preconditioned gradients every step (gradient-sized).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .distributed import Communicator, balanced_owners
from .layer_steps import GeneralStep
from .preconditioner import DampingSplit, pi_damping

if TYPE_CHECKING:
    from .layers import KFACLayer
    from .step_rules import StepRule


class WorkAssignment:
    """Every rank refreshes and preconditions every layer."""

    #: Whether a layer's step may be written in place where it is computed (no other rank needs its direction).
    fuses = True

    def __init__(self, comm: Communicator, layers: Sequence[KFACLayer]) -> None:
        self.comm = comm
        self.owners = [comm.rank] * len(layers)

    @staticmethod
    def create(distribution: str, comm: Communicator, layers: Sequence[KFACLayer]) -> WorkAssignment:
        """The assignment named by ``work_distribution``."""
        return LayerwiseAssignment(comm, layers) if distribution == "layerwise" else WorkAssignment(comm, layers)

    def owns(self, index: int) -> bool:
        """Whether this rank does layer ``index``'s refresh and preconditioning."""
        return self.owners[index] == self.comm.rank

    def refresh(
        self, layers: Sequence[KFACLayer], rules: Sequence[StepRule], damping: float, split: DampingSplit = pi_damping
    ) -> None:
        """Refresh the owned layers' factors, prepare their damped inverses (λ split by ``split``), rebase their rules."""
        for index, (layer, rule) in enumerate(zip(layers, rules)):
            if self.owns(index):
                for factor in layer.factors:
                    if factor.initialized:
                        factor.refresh()
                if layer.ready:
                    layer.prepare_inverses(damping, split)
                    rule.rebase()

    @staticmethod
    def prepare(layers: Sequence[KFACLayer], damping: float, split: DampingSplit = pi_damping) -> None:
        """Re-prepare every ready layer's damped inverses at a new damping (k×k work, on every rank)."""
        for layer in layers:
            if layer.ready:
                layer.prepare_inverses(damping, split)

    def share_directions(self, steps: Sequence[tuple[int, GeneralStep]]) -> None:
        """Hand every rank the directions computed by their owners (nothing to do when each rank computed all)."""


class LayerwiseAssignment(WorkAssignment):
    """One owner per layer; the owners broadcast what they computed."""

    def __init__(self, comm: Communicator, layers: Sequence[KFACLayer]) -> None:
        super().__init__(comm, layers)
        self.owners = balanced_owners([layer.work_cost() for layer in layers], comm.world_size)
        self.fuses = not comm.active

    def refresh(
        self, layers: Sequence[KFACLayer], rules: Sequence[StepRule], damping: float, split: DampingSplit = pi_damping
    ) -> None:
        super().refresh(layers, rules, damping, split)
        if not self.comm.active:
            return
        groups = [[t for f in layer.factors if f.initialized for t in f.basis_tensors()] for layer in layers]
        self.comm.broadcast_from_owners(groups, self.owners, kind="bases")
        for index, (layer, rule) in enumerate(zip(layers, rules)):
            if not self.owns(index):
                for factor in layer.factors:
                    factor.refreshed = factor.refreshed or factor.initialized
                if layer.ready:  # k×k work: keeps every rank's state (and checkpoint) consistent
                    layer.prepare_inverses(damping, split)
                    rule.rebase()

    def share_directions(self, steps: Sequence[tuple[int, GeneralStep]]) -> None:
        if self.comm.active:
            naturals = [step.naturals for _, step in steps]
            self.comm.broadcast_from_owners(naturals, [self.owners[index] for index, _ in steps], kind="gradients")
