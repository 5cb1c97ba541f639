"""Weight sparsity: masks, pruning methods (one module each) and their registry."""

from . import magnitude, sparsegpt, wanda  # noqa: F401  (each registers itself)
from .base import METHODS, InputStatistics, PruningMethod, get_method, register
from .masks import Pattern

__all__ = ["METHODS", "InputStatistics", "Pattern", "PruningMethod", "get_method", "register"]
