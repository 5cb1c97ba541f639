"""Gradual magnitude pruning (Zhu & Gupta 2017, arXiv 1710.01878) on the cubic schedule.

    s_t = s_f + (s_0 - s_f) (1 - (t - t_0) / (n Δt))^3,   t in {t_0, t_0 + Δt, ..., t_0 + n Δt}

Every Δt steps the masks are recomputed from |W| at the sparsity of that step and held until the
next update; before t_0 the model is left dense, after t_0 + nΔt the masks stay at s_f while
training continues. N:M patterns grow towards their final groups (``masks.gradual_mask``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import SparseLLMError
from ..weights.masks import Pattern, check_sparsity, gradual_mask
from .sparsifier import MaskSchedule, register

PRUNE_UNTIL = 0.75  # default: reach the final sparsity at 3/4 of the run, then train at it
UPDATES = 20  # default number of mask updates on the way


def cubic_sparsity(step: int, initial: float, final: float, start: int, span: int) -> float:
    """The cubic schedule at ``step``, clamped: ``initial`` up to ``start``, ``final`` from ``start + span``."""
    progress = 1.0 if span <= 0 else min(max((step - start) / span, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


@register
@dataclass
class GradualMagnitude(MaskSchedule):
    name = "gmp"

    initial_sparsity: float = 0.0  # s_0
    start: int = 0  # t_0
    every: int = 1  # Δt
    updates: int = 1  # n: the last update, at t_0 + n Δt, reaches the final sparsity

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.initial_sparsity)
        if self.every < 1 or self.updates < 0 or self.start < 0:
            raise SparseLLMError("gmp needs --update-every >= 1 and a pruning window inside the run")

    @classmethod
    def for_steps(cls, steps: int, sparsity: float, pattern: Pattern | str, *, start: int = 0,
                  end: int | None = None, every: int | None = None, **options) -> GradualMagnitude:
        end = round(PRUNE_UNTIL * (steps - 1)) if end is None else end
        if not 0 <= start <= end < max(steps, 1):
            raise SparseLLMError(f"gmp: the pruning window [{start}, {end}] must lie within the {steps} steps")
        every = every or max(1, (end - start) // UPDATES)
        return cls(sparsity=sparsity, pattern=pattern, start=start, every=every, updates=(end - start) // every,
                   **options)

    def update_steps(self) -> list[int]:
        return [self.start + k * self.every for k in range(self.updates + 1)]

    def sparsity_at(self, step: int, final: float) -> float:
        """The sparsity the masks hold during ``step``: the schedule's value at the last update so far."""
        if step < self.start:
            return 0.0
        last = self.start + min((step - self.start) // self.every, self.updates) * self.every
        return cubic_sparsity(last, min(self.initial_sparsity, final), final, self.start,
                              self.updates * self.every)

    def is_update_step(self, step: int) -> bool:
        offset = step - self.start
        return offset >= 0 and offset % self.every == 0 and offset // self.every <= self.updates

    def initial_masks(self, weights: Mapping[str, torch.Tensor], targets: Mapping[str, float]) -> dict:
        return {name: torch.ones_like(weight, dtype=torch.bool) for name, weight in weights.items()}

    def update(self, step: int, weights: Mapping[str, torch.Tensor], gradients: Mapping[str, torch.Tensor] | None,
               masks: Mapping[str, torch.Tensor], targets: Mapping[str, float]) -> dict[str, torch.Tensor]:
        return {name: gradual_mask(weight.abs(), self.sparsity_at(step, targets[name]), self.pattern)
                for name, weight in weights.items()}
