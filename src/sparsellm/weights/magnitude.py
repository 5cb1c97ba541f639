"""Magnitude pruning: drop the smallest |W|, over the whole matrix (default) or per output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import InputStatistics, PruningMethod, register
from .masks import Pattern, pattern_mask


@register
@dataclass
class Magnitude(PruningMethod):
    name = "magnitude"
    per_row: bool = False

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float,
              pattern: Pattern) -> torch.Tensor:
        keep = pattern_mask(weight.abs(), sparsity, pattern, per_row=self.per_row)
        return weight.mul_(keep)
