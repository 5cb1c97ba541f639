"""RigL (Evci et al. 2020): drop the weakest connections and regrow where the gradient is largest.

Every Δt steps until T_end, each layer drops the fraction f(t) of its active weights with the
smallest |W| and regrows as many among the inactive ones (the just-dropped included) with the
largest |∂L/∂W| of the current batch, so its count of active weights never changes.
f(t) = f_0 / 2 · (1 + cos(π t / T_end)). Regrown weights start at zero with fresh optimizer
state (the Sparsifier zeroes both for every weight outside the mask). Per-layer densities are
uniform or ERK; the starting mask keeps the largest |W| of each layer (the zeros of a model that
one-shot pruning already brought to those densities).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import SparseLLMError
from ..weights.masks import Pattern, prune_lowest, unstructured_mask
from .gmp import PRUNE_UNTIL, UPDATES
from .sparsifier import MaskSchedule, register


def cosine_drop_fraction(step: int, initial: float, end: int) -> float:
    """f(t) = f_0 / 2 · (1 + cos(π t / T_end)), and 0 from T_end on."""
    if step >= end:
        return 0.0
    return initial / 2.0 * (1.0 + math.cos(math.pi * step / end))


def drop_and_grow(weight: torch.Tensor, gradient: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """The new keep-mask: ``count`` active weights with the smallest |W| leave, and ``count`` inactive
    weights (after the drop) with the largest |gradient| enter."""
    count = min(count, int(mask.sum()))
    if count <= 0:
        return mask.clone()
    kept = mask & prune_lowest(weight.abs().masked_fill(~mask, float("inf")), count)
    grow_scores = gradient.abs().masked_fill(kept, float("-inf")).flatten()
    grown = torch.topk(grow_scores, count, sorted=False).indices
    new = kept.flatten().clone()
    new[grown] = True
    return new.view_as(mask)


@register
@dataclass
class RigL(MaskSchedule):
    name = "rigl"
    needs_gradients = True

    drop_fraction: float = 0.3  # f_0
    every: int = 100  # Δt
    end: int = 1  # T_end: no updates from here on

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern.is_nm:
            raise SparseLLMError("rigl regrows single weights, so it keeps unstructured masks; "
                                 "use gmp or finetune for N:M patterns")
        if not 0.0 <= self.drop_fraction < 1.0 or self.every < 1:
            raise SparseLLMError("rigl needs a drop fraction in [0, 1) and --update-every >= 1")

    @classmethod
    def for_steps(cls, steps: int, sparsity: float, pattern: Pattern | str, *, end: int | None = None,
                  every: int | None = None, **options) -> RigL:
        end = round(PRUNE_UNTIL * steps) if end is None else end
        every = every or max(1, end // UPDATES)
        return cls(sparsity=sparsity, pattern=pattern, end=end, every=every, **options)

    def is_update_step(self, step: int) -> bool:
        return 0 < step < self.end and step % self.every == 0

    def initial_masks(self, weights: Mapping[str, torch.Tensor], targets: Mapping[str, float]) -> dict:
        return {name: unstructured_mask(weight.abs(), targets[name]) for name, weight in weights.items()}

    def update(self, step: int, weights: Mapping[str, torch.Tensor], gradients: Mapping[str, torch.Tensor] | None,
               masks: Mapping[str, torch.Tensor], targets: Mapping[str, float]) -> dict[str, torch.Tensor]:
        fraction = cosine_drop_fraction(step, self.drop_fraction, self.end)
        return {name: drop_and_grow(weights[name], gradients[name], mask, round(fraction * int(mask.sum())))
                for name, mask in masks.items()}
