"""OWL, outlier-weighted layer-wise sparsity (Yin et al. 2024): prune blocks with more outliers less.

On the dense model, the Wanda scores A = |W| * ||X|| of all linear layers of block l give its
outlier ratio D_l = 100 * #{A > M * mean(A)} / numel(A). The ratios are scaled to [0, 2 lambda],

    D'_l = (D_l - min D) / (max D - min D) * 2 lambda,
    S_l  = 1 - (D'_l - mean(D') + 1 - S),

so the block sparsities S_l lie in [S - lambda, S + lambda] and average to the target S. Every
layer of block l is pruned to S_l (then ``realize`` makes the budget exact to the weight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ... import engine
from ...errors import SparseLLMError
from ...models import weight_matrix
from ..base import NORMS, InputStatistics
from ..wanda import wanda_scores
from .base import Allocation, BlockInputs, LayerSlot, block_ratios_to_layers, register


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Percentage of the scores (all tensors together) above ``m`` times their mean."""
    count = sum(s.numel() for s in scores)
    mean = sum(s.double().sum() for s in scores) / count
    outliers = sum((s.double() > m * mean).sum() for s in scores)
    return 100.0 * float(outliers) / count


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """The published OWL formula: block sparsities in [target - lam, target + lam] averaging ``target``."""
    low, high = min(ratios), max(ratios)
    if high == low:  # no block stands out: nothing to weight by
        return [target] * len(ratios)
    scaled = [(d - low) / (high - low) * 2 * lam for d in ratios]
    mean = sum(scaled) / len(scaled)
    return [1.0 - (d - mean + 1.0 - target) for d in scaled]


@register
@dataclass
class OWL(Allocation):
    name = "owl"
    needs = frozenset({NORMS})
    m: float = 5.0  # outlier threshold M: a score counts as an outlier above M x the block's mean
    lam: float = 0.08  # lambda: the largest shift of a block's sparsity away from the target
    outlier_ratios: dict[str, float] = field(default_factory=dict, init=False, repr=False)  # per block

    def __post_init__(self) -> None:
        if self.m <= 0 or not 0 <= self.lam < 0.5:
            raise SparseLLMError(f"OWL needs M > 0 and 0 <= lambda < 0.5, got M={self.m:g}, lambda={self.lam:g}")

    def options(self) -> dict:
        return {"m": self.m, "lam": self.lam}

    def observe(self, step: engine.BlockStep, stats: Mapping[str, InputStatistics],
                slots: Sequence[LayerSlot], inputs: BlockInputs | None) -> None:
        layers = step.layers
        scores = [wanda_scores(weight_matrix(layers[s.name]), stats[s.name].input_norms()) for s in slots]
        self.outlier_ratios[step.name] = outlier_ratio(scores, self.m)

    def block_sparsity(self, target: float) -> dict[str, float]:
        blocks = list(self.outlier_ratios)
        return dict(zip(blocks, owl_sparsities([self.outlier_ratios[b] for b in blocks], target, self.lam),
                        strict=True))

    def solve(self, slots: Sequence[LayerSlot], target: float | None) -> dict[str, float]:
        if target is None:
            raise SparseLLMError("OWL needs a target sparsity")
        return block_ratios_to_layers(self.block_sparsity(target), slots)

    def statistics(self) -> dict:
        if not self.outlier_ratios:
            return {}
        return {"blocks": list(self.outlier_ratios), "outlier_ratio": list(self.outlier_ratios.values())}
