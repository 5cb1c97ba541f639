"""Allocation strategies: how much of each layer to prune for a global target (one module each)."""

from . import owl, sensitivity, table, uniform  # noqa: F401  (each registers itself)
from .base import (
    ALLOCATIONS,
    Allocation,
    LayerSlot,
    Plan,
    dense_pass,
    get_allocation,
    layer_slots,
    realize,
    register,
)

__all__ = ["ALLOCATIONS", "Allocation", "LayerSlot", "Plan", "dense_pass", "get_allocation", "layer_slots",
           "realize", "register"]
