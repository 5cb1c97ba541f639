"""Bit-level packing shared by the layouts: masks, small integer codes and N:M pattern numbers.

Everything is little-endian at the bit level (LSB first), as numpy's ``packbits(bitorder="little")``
and the compressed-tensors bitmask: bit j of byte k holds item 8k + j.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """(rows, columns) bool -> (rows, ceil(columns / 8)) uint8, each row padded with zero bits."""
    return torch.from_numpy(np.packbits(keep.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_mask(bitmask: torch.Tensor, columns: int) -> torch.Tensor:
    """The inverse of ``pack_mask``: (rows, ceil(columns / 8)) uint8 -> (rows, columns) bool."""
    bits = np.unpackbits(bitmask.numpy(), axis=-1, count=columns, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool)


def padding_bits_set(bitmask: torch.Tensor, columns: int) -> bool:
    """Whether any bit past ``columns`` in a row is set (a well-formed mask pads with zeros)."""
    spare = bitmask.shape[-1] * 8 - columns
    if spare == 0 or bitmask.numel() == 0:
        return False
    return bool((bitmask[..., -1] >> (8 - spare)).any())


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) integers < 2**bits (bits dividing 8) -> (..., ceil(n * bits / 8)) uint8, LSB first."""
    per_byte = 8 // bits
    count = codes.shape[-1]
    padded = torch.zeros(*codes.shape[:-1], -(-count // per_byte) * per_byte, dtype=torch.uint8)
    padded[..., :count] = codes
    if per_byte == 1:
        return padded
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (padded.view(*codes.shape[:-1], -1, per_byte) << shifts).sum(-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of ``pack_codes``: the first ``count`` codes of each row, as uint8."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed[..., :count]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def packed_code_bytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


# -- N:M patterns ------------------------------------------------------------------------------
# Each group of M weights keeps N of them: one of C(M, N) patterns, numbered 0..P-1 in
# lexicographic order of the kept positions. Several pattern numbers share a byte as digits of a
# base-P number (least significant first): 2:4 has P = 6, so 3 groups (6^3 = 216) fit in a byte:
# 8 bits per 12 weights instead of a 12-bit mask.


@functools.lru_cache(maxsize=32)
def pattern_table(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables over the 2^m masks of one group (bit j = position j kept).

    Returns (patterns (P, m) bool, the pattern number of each mask (-1 unless exactly N kept), and
    each mask topped up to N kept with its first free positions (-1 when more than N are kept)).
    """
    combos = list(itertools.combinations(range(m), n))
    patterns = np.zeros((len(combos), m), dtype=bool)
    numbers = np.full(2**m, -1, dtype=np.int64)
    for number, kept in enumerate(combos):
        patterns[number, list(kept)] = True
        numbers[sum(1 << j for j in kept)] = number
    filled = np.full(2**m, -1, dtype=np.int64)
    for value in range(2**m):
        missing = n - bin(value).count("1")
        if missing >= 0:
            free = [j for j in range(m) if not value >> j & 1][:missing]
            filled[value] = value | sum(1 << j for j in free)
    return patterns, numbers, filled


def group_masks(keep: torch.Tensor, m: int) -> np.ndarray:
    """(rows, columns) bool -> (rows, columns / m): each group of m as an m-bit number, LSB first."""
    rows, columns = keep.shape
    if 8 % m == 0:  # whole groups share each byte of the row's bitmask
        packed = np.packbits(keep.numpy(), axis=-1, bitorder="little")
        groups = (packed[..., None] >> np.arange(0, 8, m, dtype=np.uint8)) & (2**m - 1)
        return groups.reshape(rows, -1)[:, : columns // m]
    packed = np.packbits(keep.numpy().reshape(rows, columns // m, m), axis=-1, bitorder="little").astype(np.int64)
    return packed[..., 0] | (packed[..., 1] << 8) if m > 8 else packed[..., 0]


def patterns_per_byte(n: int, m: int) -> int:
    """How many pattern numbers share a byte; 0 when one does not fit (C(M, N) > 256)."""
    count = math.comb(m, n)
    return math.floor(math.log(256, count) + 1e-9) if count <= 256 else 0


def pack_patterns(numbers: np.ndarray, n: int, m: int) -> torch.Tensor:
    """(rows, groups) pattern numbers -> (rows, ceil(groups / k)) uint8, k numbers per byte."""
    base, per_byte = math.comb(m, n), patterns_per_byte(n, m)
    rows, groups = numbers.shape
    padded = np.zeros((rows, -(-groups // per_byte) * per_byte), dtype=np.int32)
    padded[:, :groups] = numbers
    weights = base ** np.arange(per_byte, dtype=np.int32)
    return torch.from_numpy((padded.reshape(rows, -1, per_byte) * weights).sum(-1).astype(np.uint8))


def unpack_patterns(packed: torch.Tensor, n: int, m: int, groups: int) -> tuple[torch.Tensor, bool]:
    """(pattern numbers (rows, groups) int64, whether every byte was well formed)."""
    base, per_byte = math.comb(m, n), patterns_per_byte(n, m)
    values = packed.to(torch.int64)
    weights = base ** torch.arange(per_byte, dtype=torch.int64)
    digits = (values.unsqueeze(-1) // weights) % base
    numbers = digits.reshape(packed.shape[0], -1)
    # a byte holds at most base^k - 1, and digits past the last group are zero padding
    valid = bool((values < base**per_byte).all()) and not bool(numbers[:, groups:].any())
    return numbers[:, :groups], valid
