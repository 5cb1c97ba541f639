"""OWL, outlier-weighted layer-wise sparsity (Yin et al. 2024): prune blocks with more outliers less.

On the dense model, the Wanda scores A = |W| * ||X|| of all linear layers of block l give its
outlier ratio D_l = 100 * #{A > M * mean(A)} / numel(A). The ratios are scaled to [0, 2 lambda],

    D'_l = (D_l - min D) / (max D - min D) * 2 lambda,
    S_l  = 1 - (D'_l - mean(D') + 1 - S),

so the block sparsities S_l lie in [S - lambda, S + lambda] and average to the target S. Every
layer of block l is pruned to S_l (then ``realize`` makes the budget exact to the weight).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ... import engine
from ...errors import SparseLLMError
from ...logging_utils import logger
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


M_GRID = (3.0, 5.0, 7.0, 10.0, 20.0)
LAMBDA_GRID = (0.02, 0.05, 0.08, 0.12)


@dataclass
class Tuned:
    """``tune_owl``'s answer: the chosen OWL (it keeps its outlier ratios) and every candidate's score."""

    owl: OWL
    grid: list[dict]  # {"m", "lam", "perplexity"} on the held-out windows; m "uniform" for the baseline
    held_out_windows: int

    @property
    def best(self) -> dict:
        """The chosen grid point (the lowest held-out perplexity among the OWL candidates)."""
        return _best(self.grid)

    def to_dict(self) -> dict:
        return {"grid": self.grid, "best": self.best, "held_out_windows": self.held_out_windows}


def _best(grid: list[dict]) -> dict:
    return min(grid[1:], key=lambda candidate: candidate["perplexity"])  # grid[0] is uniform


@torch.no_grad()
def tune_owl(model, tokenizer, target: float, *, calib="builtin", nsamples: int = 64, held_out: int = 16,
             seqlen: int = 512, ms: Sequence[float] = M_GRID, lams: Sequence[float] = LAMBDA_GRID,
             batch_size: int = 8, device=None) -> Tuned:
    """OWL's M and lambda chosen for this model, as the OWL paper tunes them per model.

    One dense calibration pass over ``nsamples`` windows gathers Wanda's statistics and every M's
    outlier ratios; each (M, lambda) is then pruned with Wanda from those statistics to ``target``
    and scored by perplexity on the ``held_out`` calibration windows that follow (never evaluation
    text). The model's weights are restored afterwards. Uniform sparsity is scored too, for reference.
    """
    from ...evaluation import window_nll
    from ...models import set_weight_matrix
    from ..oneshot import calibration_windows, prune
    from .base import dense_pass, layer_slots

    if held_out < 1:
        raise SparseLLMError("tuning OWL needs at least one held-out calibration window")
    windows, _ = calibration_windows(model, tokenizer, calib, nsamples + held_out, seqlen)
    calibration, scored = windows[:nsamples], windows[nsamples:]
    slots = layer_slots(model)
    owls = {m: OWL(m=m) for m in ms}

    def observe(*args) -> None:
        for owl in owls.values():
            owl.observe(*args)

    statistics = dense_pass(model, calibration, slots, frozenset({NORMS}), observe, keep=True,
                            batch_size=batch_size, device=device)
    modules = dict(model.named_modules())
    dense = {s.name: weight_matrix(modules[s.name]).clone() for s in slots}

    def held_out_perplexity(allocation) -> float:
        prune(model, tokenizer, method="wanda", sparsity=target, allocation=allocation, statistics=statistics,
              batch_size=batch_size, device=device)
        total, count = window_nll(model, scored)
        for name, weight in dense.items():
            set_weight_matrix(modules[name], weight)
        return math.exp(total / count)

    grid = [{"m": "uniform", "lam": 0.0, "perplexity": held_out_perplexity("uniform")}]
    for m, owl in owls.items():
        for lam in lams:
            owl.lam = lam
            grid.append({"m": m, "lam": lam, "perplexity": held_out_perplexity(owl)})
            logger.info("OWL M %g lambda %g: held-out perplexity %.3f", m, lam, grid[-1]["perplexity"])
    best = _best(grid)
    chosen = owls[best["m"]]
    chosen.lam = best["lam"]
    logger.info("OWL tuned: M %g, lambda %g (held-out perplexity %.3f; uniform %.3f)", best["m"], best["lam"],
                best["perplexity"], grid[0]["perplexity"])
    return Tuned(chosen, grid, held_out)
