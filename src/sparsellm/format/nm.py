"""N:M positions: which N of every M consecutive inputs of a row are kept.

Two encodings. ``sparse-24-bitmask`` (compressed-tensors, 2:4 only): a full bitmask with exactly two
bits set per group of four, values (rows, columns / 2). ``sparse-nm`` (sparsellm, any N:M with
C(M, N) <= 256): one pattern number per group (see ``bits.pack_patterns``), so 2:4 costs 2/3 bit
per weight instead of 1. Groups that kept fewer than N non-zeros store explicit zeros at their
first free positions, so every group holds exactly N values.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SparseLLMError
from ..weights.masks import Pattern
from .bits import group_masks, pack_patterns, pattern_table, patterns_per_byte, unpack_patterns


def fits(keep: torch.Tensor, pattern: Pattern) -> bool:
    """Whether a keep-mask has at most N kept of every M (and a width divisible by M)."""
    if not encodable(pattern) or keep.shape[1] % pattern.m:
        return False
    _, _, filled = pattern_table(pattern.n, pattern.m)
    return bool((filled[group_masks(keep, pattern.m)] >= 0).all())


def encodable(pattern: Pattern) -> bool:
    return pattern.is_nm and pattern.m <= 16 and patterns_per_byte(pattern.n, pattern.m) > 0


def pack(keep: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(stored positions, {"patterns": ...}) of a mask that fits: groups with fewer than N kept are
    topped up with their first free positions."""
    table, numbers, filled = pattern_table(pattern.n, pattern.m)
    chosen = numbers[filled[group_masks(keep, pattern.m)]]
    positions = torch.from_numpy(table[chosen].reshape(keep.shape))
    return positions, {"patterns": pack_patterns(chosen, pattern.n, pattern.m)}


def check_patterns(packed: torch.Tensor, shape: tuple[int, int], pattern: Pattern, name: str) -> None:
    """The pattern bytes have the shape and dtype of a (rows, columns) weight's (not their contents)."""
    rows, columns = shape
    groups = columns // pattern.m
    per_byte = patterns_per_byte(pattern.n, pattern.m) if encodable(pattern) else 0
    if not per_byte or columns % pattern.m or tuple(packed.shape) != (rows, -(-groups // per_byte)) \
            or packed.dtype != torch.uint8:
        raise SparseLLMError(f"{name}.patterns: shape {tuple(packed.shape)} does not fit a {rows}x{columns} "
                             f"weight with pattern {pattern}")


def unpack(tensors: dict[str, torch.Tensor], shape: tuple[int, int], pattern: Pattern, name: str) -> torch.Tensor:
    rows, columns = shape
    packed = tensors["patterns"]
    check_patterns(packed, shape, pattern, name)
    numbers, valid = unpack_patterns(packed, pattern.n, pattern.m, columns // pattern.m)
    if not valid:
        raise SparseLLMError(f"{name}.patterns: holds numbers that are not {pattern} patterns")
    table, _, _ = pattern_table(pattern.n, pattern.m)
    return torch.from_numpy(table[numbers.numpy()].reshape(rows, columns))


# per mask byte: whether its low and its high four bits each have exactly two set
_TWO_AND_TWO = np.array([bin(b & 15).count("1") == 2 and bin(b >> 4).count("1") == 2 for b in range(256)])


def check_24_bitmask(packed: torch.Tensor, columns: int, name: str) -> None:
    """A packed (rows, ceil(columns / 8)) mask sets exactly 2 of every 4 bits (padding bits: the caller's)."""
    from ..kernels.backend import extension

    module = extension()
    if module is not None:
        ok = module.bitmask_two_of_four(packed.contiguous(), columns)
    else:
        whole = packed.numpy()[:, : columns // 8]
        ok = columns % 4 == 0 and bool(_TWO_AND_TWO[whole].all())
        if ok and columns % 8:  # the last byte holds one group, then padding
            ok = bool(_TWO_AND_TWO[packed.numpy()[:, -1] | 0b0011_0000].all())
    if not ok:
        raise SparseLLMError(f"{name}.bitmask: not exactly 2 of every 4 bits set, as sparse-24-bitmask requires")
