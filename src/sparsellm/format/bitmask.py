"""Unstructured positions: one bit per weight, and where each row's values start.

The layout of compressed-tensors' ``sparse-bitmask``: ``bitmask`` (rows, ceil(columns / 8)) uint8,
LSB first, rows padded with zero bits; ``row_offsets`` (rows,) the index in the flat values of each
row's first value (compressed-tensors writes int64; we write int32 when the count allows, its
reader does not use them).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SparseLLMError
from .bits import pack_mask, padding_bits_set, unpack_mask


def pack(keep: torch.Tensor) -> dict[str, torch.Tensor]:
    counts = torch.from_numpy(np.count_nonzero(keep.numpy(), axis=1))
    offsets = torch.cumsum(counts, 0) - counts
    index_dtype = torch.int32 if keep.numel() < 2**31 else torch.int64
    return {"bitmask": pack_mask(keep), "row_offsets": offsets.to(index_dtype)}


def unpack(tensors: dict[str, torch.Tensor], shape: tuple[int, int], values: int, name: str) -> torch.Tensor:
    """The keep-mask, after checking it agrees with the shape, the row offsets and the number of values."""
    rows, columns = shape
    bitmask, offsets = tensors["bitmask"], tensors["row_offsets"]
    if tuple(bitmask.shape) != (rows, -(-columns // 8)) or bitmask.dtype != torch.uint8:
        raise SparseLLMError(f"{name}.bitmask: shape {tuple(bitmask.shape)} does not fit a {rows}x{columns} weight")
    if padding_bits_set(bitmask, columns):
        raise SparseLLMError(f"{name}.bitmask: bits set past the last column")
    keep = unpack_mask(bitmask, columns)
    counts = torch.from_numpy(np.count_nonzero(keep.numpy(), axis=1))
    if int(counts.sum()) != values:
        raise SparseLLMError(f"{name}.bitmask: {int(counts.sum())} bits set but {values} values stored")
    if tuple(offsets.shape) != (rows,) or not torch.equal(offsets.long(), torch.cumsum(counts, 0) - counts):
        raise SparseLLMError(f"{name}.row_offsets: do not match the rows of the bitmask")
    return keep
