"""Attention sparsity: sliding window, BigBird and Performer, as functions and as drop-in attention for HF models.

>>> import sparsellm.attention as sa
>>> sa.apply(model, "window", window=256)     # every attention layer of an HF model, in place
>>> sa.apply(model, "sdpa")                   # back to full attention
"""

from . import bigbird, performer, window  # noqa: F401  (each registers itself)
from .base import METHODS, SparseAttention, get_method, parse_spec, register
from .bigbird import BigBirdAttention, bigbird_attention
from .hf import apply, compare, current, implementation_name, register_all, restore
from .performer import PerformerAttention, draw_projection, performer_attention
from .window import WindowAttention, window_attention

register_all()

__all__ = [
    "METHODS", "BigBirdAttention", "PerformerAttention", "SparseAttention", "WindowAttention", "apply",
    "bigbird_attention", "compare", "current", "draw_projection", "get_method", "implementation_name",
    "parse_spec", "performer_attention", "register", "restore", "window_attention",
]
