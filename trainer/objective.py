"""The UniMRG objective: a weighted sum of the per-task losses.

    total = sum over enabled tasks t of  w_t * L_t

with L_understanding the answer-token cross-entropy and L_reconstruction, L_depth,
L_segmentation the VQ-code cross-entropies of the generated images (see trainer/adapters/). The
paper uses w_t = 1 for all four and one batch of each task per optimizer step (`round_robin`).
With the `weighted` sampler the weights already set how often a task is drawn, so each drawn
batch's loss counts with coefficient 1 (weighting twice would square the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Objective"]


@dataclass(frozen=True)
class Objective:
    weights: dict[str, float]
    sampler: str = "round_robin"

    @property
    def tasks(self) -> list[str]:
        return [t for t, w in self.weights.items() if w > 0]

    def coefficient(self, task: str) -> float:
        """What one batch's loss of `task` is multiplied by before backward."""
        return 1.0 if self.sampler == "weighted" else float(self.weights[task])

    @staticmethod
    def task_loss(adapter: Any, task: str, batch: dict[str, Any]) -> Any:
        if task == "understanding":
            return adapter.understanding_loss(batch)
        return adapter.generation_loss(batch)

    def total(self, losses: dict[str, float]) -> float:
        """The logged objective of one step from its per-task mean losses."""
        return sum(float(self.weights[t]) * v for t, v in losses.items())
