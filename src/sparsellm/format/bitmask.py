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
from . import codec
from .bits import padding_bits_set, unpack_mask


def pack(found: codec.Scan, columns: int) -> dict[str, torch.Tensor]:
    index_dtype = torch.int32 if found.bitmask.shape[0] * columns < 2**31 else torch.int64
    return {"bitmask": found.bitmask, "row_offsets": found.offsets().to(index_dtype)}


def check_shapes(tensors: dict[str, torch.Tensor], shape: tuple[int, int], name: str) -> None:
    """The bitmask fits the shape (padding bits clear) and there is one offset per row, starting at 0."""
    rows, columns = shape
    bitmask, offsets = tensors["bitmask"], tensors["row_offsets"]
    if tuple(bitmask.shape) != (rows, -(-columns // 8)) or bitmask.dtype != torch.uint8:
        raise SparseLLMError(f"{name}.bitmask: shape {tuple(bitmask.shape)} does not fit a {rows}x{columns} weight")
    if padding_bits_set(bitmask, columns):
        raise SparseLLMError(f"{name}.bitmask: bits set past the last column")
    if tuple(offsets.shape) != (rows,) or offsets.dtype not in (torch.int32, torch.int64) or (rows and offsets[0] != 0):
        raise SparseLLMError(f"{name}.row_offsets: do not match the rows of the bitmask")


def unpack(tensors: dict[str, torch.Tensor], shape: tuple[int, int], values: int, name: str) -> torch.Tensor:
    """The keep-mask, after checking it agrees with the shape, the row offsets and the number of values."""
    check_shapes(tensors, shape, name)
    bitmask, offsets = tensors["bitmask"], tensors["row_offsets"]
    keep = unpack_mask(bitmask, shape[1])
    counts = torch.from_numpy(np.count_nonzero(keep.numpy(), axis=1))
    if int(counts.sum()) != values:
        raise SparseLLMError(f"{name}.bitmask: {int(counts.sum())} bits set but {values} values stored")
    if not torch.equal(offsets.long(), torch.cumsum(counts, 0) - counts):
        raise SparseLLMError(f"{name}.row_offsets: do not match the rows of the bitmask")
    return keep
