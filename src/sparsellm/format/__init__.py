"""Checkpoint formats: compact folders whose size follows the sparsity (and quantization) of the model.

``save`` / ``load`` handle whole folders (``compact.py``); ``layout.py`` packs one matrix;
``bitmask.py``, ``nm.py`` and ``bits.py`` are the bit-level encodings; ``manifest.py`` checks
integrity. docs/FORMAT.md describes the bytes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .compact import CompactFolder, compress, is_compact, layers, save
from .layout import LAYOUTS, EncodedLayer, encode, layout_bytes


def load(folder: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """A transformers model from a compact folder (decoded layer by layer) or a dense sparsellm folder."""
    from ..models import load_model, parse_dtype

    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if is_compact(folder):
        from .compact import load as load_compact

        return load_compact(folder, dtype)
    return load_model(folder, dtype)[0]


__all__ = ["LAYOUTS", "CompactFolder", "EncodedLayer", "compress", "encode", "is_compact", "layers", "layout_bytes", "load",
           "save"]
