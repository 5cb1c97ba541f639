"""The compact layouts' hot loops: scan a matrix, gather its kept values, scatter them back (sparse-bitmask),
and encode / decode whole N:M matrices, quantized codes included (sparse-nm, sparse-24-bitmask).

Each runs compiled (``kernels/csrc/codec.cpp``: one threaded pass per matrix, with AVX-512
test / compress / expand where the CPU has them) when the kernels' extension builds, else in
numpy; ``impl`` forces one ("numpy", "portable", "avx512"), and the tests hold them to the same
bits. Floats travel as their raw 16- or 32-bit patterns, so every dtype (NaN included)
comes back exactly; a weight is pruned when its bits are +-0. A dense save is one copy per weight,
and so is this: the numpy path makes a dozen passes (masks, counts, boolean indexing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SparseLLMError
from ..weights.masks import Pattern
from ..weights.quant import QuantGrid
from .bits import pack_mask, pattern_table, patterns_per_byte, unpack_mask

_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NATIVE = (2, 4)  # value sizes the compiled codec handles
_VALUE_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # codec.cpp's ValueType


@dataclass
class Scan:
    """What one pass over a matrix learns: its bitmask, non-zeros per row, and whether it is 2:4."""

    bitmask: torch.Tensor  # (rows, ceil(columns / 8)) uint8, LSB first
    counts: torch.Tensor  # (rows,) int64
    fits_24: bool  # every group of 4 consecutive weights has at most 2 non-zeros

    @property
    def nonzeros(self) -> int:
        return int(self.counts.sum())

    def offsets(self) -> torch.Tensor:
        """Where each row's values start in the flat values (int64)."""
        return torch.cumsum(self.counts, 0) - self.counts


IMPLEMENTATIONS = ("numpy", "portable", "avx512")


def _compiled(impl: str | None, tensor: torch.Tensor):
    """(extension module, use AVX-512) for ``impl`` (None: the best there is), or None for numpy."""
    if impl not in (None, *IMPLEMENTATIONS):
        raise SparseLLMError(f"unknown codec implementation {impl!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if impl == "numpy" or tensor.element_size() not in _NATIVE:
        return None
    from ..kernels.backend import cpu_isas, extension

    module = extension()
    if module is None:
        if impl is not None:
            raise SparseLLMError("the compiled codec is not available (the kernels' extension did not build)")
        return None
    avx512 = "avx512" in cpu_isas()
    if impl == "avx512" and not avx512:
        raise SparseLLMError("this CPU lacks the AVX-512 instructions the codec uses")
    return module, avx512 and impl != "portable"


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns as integers (exact for every dtype, NaN included)."""
    return tensor.contiguous().view(_INTEGER[tensor.element_size()])


# The numpy primitives (any layout, any mask): boolean indexing on the bit patterns is exact and
# much faster than torch's on floats (bfloat16 above all, on CPUs without native support).
def gather_at(matrix: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Values at the True ``positions`` (row-major); positions not in ``keep`` give +0.0."""
    bits = _bits(matrix).numpy()
    if positions is not keep:
        bits = np.where(keep.numpy(), bits, 0)
    return torch.from_numpy(np.ascontiguousarray(bits[positions.numpy()])).view(matrix.dtype)


def scatter_at(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A zero matrix with ``values`` at the True positions of ``mask``, row-major."""
    dense = torch.zeros(mask.shape, dtype=_INTEGER[values.element_size()])
    dense.numpy()[mask.numpy()] = _bits(values).numpy()
    return dense.view(values.dtype)


def scan(matrix: torch.Tensor, impl: str | None = None) -> Scan:
    bits = _bits(matrix)
    native = _compiled(impl, bits)
    if native is not None:
        module, avx512 = native
        return Scan(*module.bitmask_scan(bits, avx512))
    rows, columns = bits.shape
    signed = bits.numpy().view(f"i{bits.element_size()}")
    keep = (signed & np.array(np.iinfo(signed.dtype).max, dtype=signed.dtype)) != 0
    fits = columns % 4 == 0 and bool((keep.reshape(rows, -1, 4).sum(-1) <= 2).all())
    return Scan(pack_mask(torch.from_numpy(keep)), torch.from_numpy(np.count_nonzero(keep, axis=1).astype(np.int64)),
                fits)


def gather(matrix: torch.Tensor, found: Scan, impl: str | None = None) -> torch.Tensor:
    """The values at the set bits of ``found.bitmask``, row-major, in the matrix's dtype."""
    bits = _bits(matrix)
    native = _compiled(impl, bits)
    if native is not None:
        module, avx512 = native
        values = module.bitmask_gather(bits, found.bitmask, found.offsets(), found.nonzeros, avx512)
        return values.view(matrix.dtype)
    keep = unpack_mask(found.bitmask, bits.shape[1])
    return gather_at(matrix, keep, keep)


def scatter(values: torch.Tensor, bitmask: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
            name: str = "layer", impl: str | None = None) -> torch.Tensor:
    """Write the dense (rows, columns) matrix into ``out`` (zeros where the bitmask is clear).

    Raises if the row offsets, the bitmask and the number of values disagree (``out`` is then
    partly written); the bitmask's shape and padding bits are the caller's to check.
    """
    if values.dtype != out.dtype or not out.is_contiguous():
        raise SparseLLMError(f"{name}: scatter needs a contiguous output of the values' dtype")
    target, source = _bits(out), _bits(values).reshape(-1)  # target shares out's memory
    offsets = offsets.long().contiguous()
    native = _compiled(impl, target)
    if native is not None:
        module, avx512 = native
        consistent = module.bitmask_scatter(source, bitmask.contiguous(), offsets, target, avx512)
    else:
        keep = unpack_mask(bitmask, out.shape[1])
        counts = torch.from_numpy(np.count_nonzero(keep.numpy(), axis=1).astype(np.int64))
        consistent = int(counts.sum()) == source.numel() and torch.equal(offsets, torch.cumsum(counts, 0) - counts)
        if consistent:
            out.copy_(scatter_at(keep, values.reshape(-1)))
    if not consistent:
        raise SparseLLMError(f"{name}.bitmask: its set bits do not match the row offsets and the "
                             f"{source.numel()} values stored")
    return out


# -- N:M ----------------------------------------------------------------------------------------


@functools.cache
def _nm_tables(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """codec.cpp's lookup tables for N:M: pattern of each group mask, kept positions, digits of each
    byte, and where a byte's k groups span at most 12 bits, the whole encoding of each of their masks."""
    table, numbers, filled = pattern_table(n, m)
    topped = np.where(filled >= 0, numbers[np.maximum(filled, 0)], -1)
    positions = np.stack([np.flatnonzero(row) for row in table]).astype(np.uint8)
    base, per_byte = len(table), patterns_per_byte(n, m)
    byte = np.arange(256)
    digits = (byte[:, None] // base ** np.arange(per_byte)) % base
    digits[byte >= base**per_byte] = -1
    by_bits = np.zeros(0, dtype=np.uint32)
    if per_byte * m <= 12:  # bits 0-7 the pattern byte, 8-19 the kept positions, 31 more than N kept
        shifts = m * np.arange(per_byte)
        masks = np.arange(2 ** (per_byte * m))
        group_numbers = topped[(masks[:, None] >> shifts) & (2**m - 1)]
        known = np.maximum(group_numbers, 0)
        kept = (table[known] * (1 << np.arange(m))).sum(-1)
        by_bits = ((known * base ** np.arange(per_byte)).sum(1) | ((kept << shifts).sum(1) << 8)
                   | ((group_numbers < 0).any(1).astype(np.int64) << 31)).astype(np.uint32)
    return (torch.from_numpy(topped.astype(np.int16)), torch.from_numpy(positions),
            torch.from_numpy(digits.astype(np.int16)), torch.from_numpy(by_bits.view(np.int32)))


def _nm_native(matrix_dtype: torch.dtype, pattern: Pattern, impl: str | None):
    """(extension module, use AVX-512) for an N:M codec call, or None (numpy path) for what it does not cover."""
    if impl == "numpy" or matrix_dtype not in _VALUE_TYPES or pattern.m > 16 \
            or patterns_per_byte(pattern.n, pattern.m) == 0:
        return None
    return _compiled(impl, torch.empty(0, dtype=matrix_dtype))


def _grid_arguments(grid: QuantGrid | None, columns: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    if grid is None:
        return torch.empty(0), torch.empty(0), 0, 0
    return (grid.scale.float().contiguous(), grid.zero_point.float().contiguous(), grid.scheme.bits,
            grid.scheme.group_columns(columns))


def nm_encode(matrix: torch.Tensor, found: Scan, pattern: Pattern, grid: QuantGrid | None = None,
              name: str = "layer", impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(pattern bytes, bitmask of the stored positions, values) of a matrix that follows ``pattern``
    (at most N non-zeros per group), from its ``scan``, compiled; None where only numpy can
    (``format/nm.py``).

    Values are the stored floats (rows, columns * N / M), or with a ``grid`` the codes packed per
    row; a weight off its grid raises.
    """
    native = _nm_native(matrix.dtype, pattern, impl)
    if native is None:
        return None
    module, avx512 = native
    patterns, bitmask, values, status = module.nm_encode(
        _bits(matrix), found.bitmask.contiguous(), _VALUE_TYPES[matrix.dtype], pattern.n, pattern.m,
        *_nm_tables(pattern.n, pattern.m), *_grid_arguments(grid, matrix.shape[1]), avx512)
    if status == 1:
        raise SparseLLMError(f"{name}: keeps more than {pattern.n} of {pattern.m} weights somewhere")
    if status == 2:
        raise SparseLLMError(f"{name}: the weights are not on their quantization grid (changed after quantizing?); "
                             "save with format='dense'")
    return patterns, bitmask, values if grid is not None else values.view(matrix.dtype)


def nm_decode(patterns: torch.Tensor, values: torch.Tensor, pattern: Pattern, grid: QuantGrid | None,
              out: torch.Tensor, name: str = "layer", impl: str | None = None) -> torch.Tensor | None:
    """Write the dense matrix into ``out`` from pattern bytes and values (rows, stored per row) or
    packed codes, compiled; None (``out`` untouched) where only numpy can. Shapes are the caller's
    to check; a pattern byte the encoder never writes raises."""
    native = _nm_native(out.dtype, pattern, impl)
    if native is None:
        return None
    module, avx512 = native
    source = values if grid is not None else _bits(values)
    if not module.nm_decode(patterns.contiguous(), source.contiguous(), _VALUE_TYPES[out.dtype], pattern.n,
                            pattern.m, *_nm_tables(pattern.n, pattern.m), *_grid_arguments(grid, out.shape[1]),
                            _bits(out), avx512):
        raise SparseLLMError(f"{name}.patterns: holds numbers that are not {pattern} patterns")
    return out
