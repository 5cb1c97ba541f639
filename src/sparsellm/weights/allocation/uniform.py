"""Uniform allocation: every layer at the target (each rounds its own count, as before allocations)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .base import Allocation, LayerSlot, register


@register
@dataclass
class Uniform(Allocation):
    name = "uniform"
    exact_budget = False

    def solve(self, slots: Sequence[LayerSlot], target: float | None) -> dict[str, float]:
        return {s.name: target for s in slots} if target is not None else {}
