"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, prune the lowest scores of each output row.

No weight update. Input norms come from the calibration pass over the (already pruned) earlier
blocks, as in the reference ``prune_wanda``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import NORMS, InputStatistics, PruningMethod, register
from .masks import Pattern, pattern_mask


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    return weight.abs() * input_norms.unsqueeze(0)


@register
@dataclass
class Wanda(PruningMethod):
    name = "wanda"
    needs = frozenset({NORMS})

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float,
              pattern: Pattern) -> torch.Tensor:
        scores = wanda_scores(weight, stats.input_norms().to(weight.device))
        keep = pattern_mask(scores, sparsity, pattern, per_row=True)
        return weight.mul_(keep)
