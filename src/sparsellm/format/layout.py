"""One weight matrix in compact form: which positions are stored (the layout) and how values are stored.

Layouts (positions) and their tensors, named ``<module>.<suffix>`` in the safetensors file:

- ``dense``: every position. Floats are the plain ``<module>.weight``; codes are ``compressed``.
- ``sparse-bitmask``: ``bitmask`` + ``row_offsets`` (see ``bitmask.py``); values flat, row by row.
- ``sparse-24-bitmask``: 2:4 as compressed-tensors stores it: ``bitmask``, values (rows, columns / 2).
- ``sparse-nm``: N:M as pattern numbers, ``patterns`` (see ``nm.py``); values (rows, columns * N / M).

Values are floats in the checkpoint's dtype, or integer codes (``QuantScheme``) packed LSB first
into ``compressed`` with ``weight_scale`` (float16) and, for asymmetric schemes,
``weight_zero_point`` (uint8), both (rows, groups). Every layout but plain dense also stores
``shape`` (int64, [rows, columns]). Values always follow row-major order of the stored positions.

Zeros are positions, not values: -0.0 is rebuilt as +0.0; every other bit pattern (NaN included)
comes back exactly. Matrices are stored (out, in); a GPT-2 ``Conv1D`` weight, kept (in, out) by
the model, is stored transposed and flagged ``transposed``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..errors import SparseLLMError
from ..weights.masks import Pattern
from ..weights.quant import QuantGrid, QuantScheme, dequantize, quantize
from . import bitmask, codec, nm
from .bits import (
    pack_codes,
    pack_mask,
    packed_code_bytes,
    padding_bits_set,
    patterns_per_byte,
    unpack_codes,
    unpack_mask,
)
from .manifest import dtype_name

DENSE, BITMASK, BITMASK_24, NM = "dense", "sparse-bitmask", "sparse-24-bitmask", "sparse-nm"
LAYOUTS = (DENSE, BITMASK, BITMASK_24, NM)
TWO_FOUR = Pattern(2, 4)
_SHAPE_BYTES = 16  # the int64 [rows, columns] ``shape`` tensor


def layout_bytes(layout: str, shape: tuple[int, int], stored: int, dtype: torch.dtype,
                 scheme: QuantScheme | None = None, pattern: Pattern | None = None) -> int:
    """Exact tensor bytes of one matrix in a layout, ``stored`` values (for N:M: rows * columns * N / M)."""
    rows, columns = shape
    if scheme is None:
        value_bytes = stored * dtype.itemsize
        quant_bytes = 0
    else:
        per_row = layout in (DENSE, NM)  # codes are packed row by row; bitmask codes are one flat stream
        value_bytes = rows * packed_code_bytes(stored // max(rows, 1), scheme.bits) if per_row and rows \
            else packed_code_bytes(stored, scheme.bits)
        groups = rows * scheme.groups(columns)
        quant_bytes = groups * 2 + (0 if scheme.symmetric else groups)
    if layout == DENSE:
        return value_bytes + (0 if scheme is None else _SHAPE_BYTES + quant_bytes)
    mask_bytes = rows * -(-columns // 8)
    if layout == BITMASK:
        offset_bytes = rows * (4 if rows * columns < 2**31 else 8)
        return _SHAPE_BYTES + value_bytes + mask_bytes + offset_bytes + quant_bytes
    if layout == BITMASK_24:
        return _SHAPE_BYTES + value_bytes + mask_bytes
    if layout == NM:
        pattern_bytes = rows * -(-(columns // pattern.m) // patterns_per_byte(pattern.n, pattern.m))
        return _SHAPE_BYTES + value_bytes + pattern_bytes + quant_bytes
    raise ValueError(layout)


@dataclass
class EncodedLayer:
    """A matrix in compact form: its raw tensors by suffix, and what is needed to read them."""

    name: str  # module name: the tensors are "<name>.<suffix>"
    layout: str
    shape: tuple[int, int]  # the stored (out, in) matrix
    dtype: torch.dtype  # of the rebuilt values
    stored: int  # values stored (kept weights, plus the explicit zeros N:M groups may need)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    pattern: Pattern = field(default_factory=Pattern)
    scheme: QuantScheme | None = None
    transposed: bool = False
    nonzeros: int = -1  # weights that are not +-0 (known when encoding; the manifest records it)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def dense_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def stored_mask(self) -> torch.Tensor:
        """Positions that hold a value, checked against the layout's own bookkeeping."""
        rows, columns = self.shape
        if self.layout == DENSE:
            return torch.ones(rows, columns, dtype=torch.bool)
        if self.layout == BITMASK:
            return bitmask.unpack(self.tensors, self.shape, self.stored, self.name)
        if self.layout == BITMASK_24:
            return unpack_mask(self._checked_24_bitmask(), columns)
        if self.layout == NM:
            return nm.unpack(self.tensors, self.shape, self.pattern, self.name)
        raise SparseLLMError(f"{self.name}: unknown layout '{self.layout}'")

    def _checked_24_bitmask(self) -> torch.Tensor:
        """The sparse-24-bitmask layout's packed mask: its shape, padding and 2-of-4 groups checked."""
        rows, columns = self.shape
        packed = self.tensors["bitmask"]
        if tuple(packed.shape) != (rows, -(-columns // 8)) or padding_bits_set(packed, columns):
            raise SparseLLMError(f"{self.name}.bitmask: does not fit a {rows}x{columns} weight")
        nm.check_24_bitmask(packed, columns, self.name)
        return packed

    def stored_values(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The stored values, row-major over the stored positions, in ``dtype`` (dequantized codes)."""
        if self.scheme is None:
            if self.layout == DENSE:
                weight = self.unpack()
                return (weight.t() if self.transposed else weight).reshape(-1)
            values = self.tensors["compressed"]
            if values.dtype != self.dtype or values.numel() != self.stored:
                raise SparseLLMError(f"{self.name}.compressed: holds {values.numel()} {values.dtype} values, "
                                     f"expected {self.stored} {self.dtype}")
            return values.reshape(-1)
        codes = self.stored_codes()
        if mask is None and self.layout == BITMASK:
            mask = self.stored_mask()
        scale, zero, view = stored_grid(self.grid(), self.layout, self.pattern, self.shape, mask)
        return dequantize(codes.view(view), scale, zero).to(self.dtype).reshape(-1)

    def packed_codes(self) -> torch.Tensor:
        """The packed codes of a quantized layer, checked: (rows, bytes) for dense and N:M, else flat."""
        rows = self.shape[0]
        packed = self.tensors["compressed"]
        per_row = self.layout in (DENSE, NM)
        expected = (rows, packed_code_bytes(self.stored // max(rows, 1), self.scheme.bits)) if per_row \
            else (packed_code_bytes(self.stored, self.scheme.bits),)
        if tuple(packed.shape) != expected or packed.dtype != torch.uint8:
            raise SparseLLMError(f"{self.name}.compressed: shape {tuple(packed.shape)}, expected {expected} uint8")
        return packed

    def stored_codes(self) -> torch.Tensor:
        """The integer codes of a quantized layer (uint8), row-major over the stored positions."""
        rows = self.shape[0]
        packed = self.packed_codes()
        if self.layout in (DENSE, NM):
            return unpack_codes(packed, self.scheme.bits, self.stored // max(rows, 1)).reshape(-1)
        return unpack_codes(packed, self.scheme.bits, self.stored)

    def grid(self) -> QuantGrid:
        rows, columns = self.shape
        groups = self.scheme.groups(columns)
        scale = self.tensors["weight_scale"]
        if tuple(scale.shape) != (rows, groups) or scale.dtype != torch.float16 or not bool((scale > 0).all()):
            raise SparseLLMError(f"{self.name}.weight_scale: expected ({rows}, {groups}) positive float16 scales")
        if self.scheme.symmetric:
            zero = torch.full((rows, groups), self.scheme.levels // 2, dtype=torch.uint8)
        else:
            zero = self.tensors["weight_zero_point"]
            if tuple(zero.shape) != (rows, groups) or zero.dtype != torch.uint8 or bool((zero.int() >= self.scheme.levels).any()):
                raise SparseLLMError(f"{self.name}.weight_zero_point: expected ({rows}, {groups}) codes "
                                     f"below {self.scheme.levels}")
        return QuantGrid(self.scheme, scale, zero)

    def unpack(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight as the model holds it (transposed back for Conv1D), in ``dtype``.

        ``out`` (the model's parameter, say) receives it when it has the right shape and dtype and
        the compiled codecs cover the layout (bitmask, 2:4 bitmask, N:M with floats or codes), which
        then costs no extra copy.
        """
        if self.layout == DENSE and self.scheme is None:  # a plain tensor, in the model's own orientation
            weight = self.tensors["weight"]
            expected = self.shape[::-1] if self.transposed else self.shape
            if tuple(weight.shape) != expected or weight.dtype != self.dtype:
                raise SparseLLMError(f"{self.name}.weight: {weight.dtype} {list(weight.shape)}, expected "
                                     f"{self.dtype} {list(expected)}")
            return weight
        direct = out is not None and not self.transposed and tuple(out.shape) == self.shape \
            and out.dtype == self.dtype and out.is_contiguous()
        dense = out if direct else torch.empty(self.shape, dtype=self.dtype)
        if self.layout == BITMASK and self.scheme is None:
            bitmask.check_shapes(self.tensors, self.shape, self.name)
            codec.scatter(self.stored_values(), self.tensors["bitmask"], self.tensors["row_offsets"], dense, self.name)
        elif self.layout == BITMASK_24 and self.scheme is None:  # 2 values a group: row r's start at r * columns / 2
            rows, columns = self.shape
            offsets = torch.arange(rows, dtype=torch.int64) * (columns // 2)
            codec.scatter(self.stored_values(), self._checked_24_bitmask(), offsets, dense, self.name)
        elif self.layout != NM or not self._decode_nm(dense):  # numpy, any layout
            mask = self.stored_mask()
            dense = codec.scatter_at(mask, self.stored_values(mask))
        return dense.t().contiguous() if self.transposed else dense

    def _decode_nm(self, dense: torch.Tensor) -> bool:
        """Decode a sparse-nm layer into ``dense`` with the compiled codec; False where only numpy can."""
        rows = self.shape[0]
        nm.check_patterns(self.tensors["patterns"], self.shape, self.pattern, self.name)
        values = self.packed_codes() if self.scheme else self.stored_values().view(rows, -1)
        grid = self.grid() if self.scheme else None
        return codec.nm_decode(self.tensors["patterns"], values, self.pattern, grid, dense, self.name) is not None


def smallest_layout(shape: tuple[int, int], nonzeros: int, patterns: Iterable[Pattern], dtype: torch.dtype,
                    scheme: QuantScheme | None = None) -> tuple[str, Pattern, int]:
    """(layout, pattern, stored values) of the smallest form of a matrix with ``nonzeros`` non-zero
    weights that follows each of the N:M ``patterns``; on a tie the first wins (structured layouts
    suit kernels best)."""
    rows, columns = shape
    candidates = []
    for pattern in patterns:
        layout = BITMASK_24 if pattern == TWO_FOUR and scheme is None else NM
        candidates.append((layout, pattern, rows * columns * pattern.n // pattern.m))
    candidates += [(BITMASK, Pattern(), nonzeros), (DENSE, Pattern(), rows * columns)]
    return min(candidates, key=lambda c: layout_bytes(c[0], shape, c[2], dtype, scheme, c[1]))


def stored_grid(grid: QuantGrid, layout: str, pattern: Pattern, shape: tuple[int, int],
                stored: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Scale and zero point (float32) for the stored values viewed as the returned shape.

    Where every row stores the same number of values per group (dense, N:M) the grids are widened
    along rows, or broadcast when groups are equal; for a bitmask, one per value from the counts.
    """
    rows, columns = shape
    width, groups = grid.scheme.group_columns(columns), grid.scale.shape[1]
    scale, zero = grid.scale.float(), grid.zero_point.float()
    kept, of = (1, 1) if layout == DENSE else (pattern.n, pattern.m) if layout in (NM, BITMASK_24) else (0, 0)
    if kept and width % of == 0:
        if columns == groups * width:
            return scale.unsqueeze(-1), zero.unsqueeze(-1), (rows, groups, width * kept // of)
        counts = torch.full((groups,), width * kept // of)
        counts[-1] = (columns - width * (groups - 1)) * kept // of
        return scale.repeat_interleave(counts, dim=1), zero.repeat_interleave(counts, dim=1), (rows, -1)
    if stored is None:  # dense: every position
        stored = torch.ones(rows, columns, dtype=torch.bool)
    if columns != groups * width:
        padded = torch.zeros(rows, groups * width, dtype=torch.bool)
        padded[:, :columns] = stored
        stored = padded
    counts = torch.count_nonzero(stored.view(rows, groups, width), dim=-1).flatten()
    return scale.flatten().repeat_interleave(counts), zero.flatten().repeat_interleave(counts), (-1,)


def cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A floating tensor in ``dtype`` (None: as is), refusing values that overflow it."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    # One reduction in the source precision: element-wise bf16/fp16 ops are slow on CPUs without them.
    largest = tensor.detach().abs().amax() if tensor.numel() else tensor.new_zeros(())
    if bool(largest > torch.finfo(dtype).max) and bool(torch.isfinite(largest)):
        raise SparseLLMError(f"{name}: values overflow {dtype_name(dtype)}; save in a wider dtype")
    return tensor.to(dtype)


def encode(name: str, matrix: torch.Tensor, grid: QuantGrid | None = None, patterns: Iterable[Pattern] = (),
           transposed: bool = False, dtype: torch.dtype | None = None) -> EncodedLayer:
    """The smallest compact form of an (out, in) ``matrix``, whose values come back in ``dtype``.

    ``patterns`` are N:M patterns the matrix may follow (checked, not trusted). With a ``grid`` the
    matrix must lie on it exactly (it does after ``sparsellm.prune(..., quantization=...)``); its
    codes are read off in the matrix's own precision and only decoding uses ``dtype``.
    """
    dtype = dtype or matrix.dtype
    matrix = matrix.contiguous()  # a Conv1D weight arrives as a transposed view
    if grid is None:
        matrix = cast(name, matrix, dtype)
    rows, columns = matrix.shape
    found = codec.scan(matrix)  # one pass: the bitmask, the counts and whether the matrix is 2:4
    patterns = list(dict.fromkeys([*patterns, TWO_FOUR]))
    # the bool mask, for what the compiled codec does not cover: other N:M patterns, codes, other layouts
    keep = unpack_mask(found.bitmask, columns) if patterns != [TWO_FOUR] else None
    scheme = grid.scheme if grid is not None else None
    fitting = [pattern for pattern in patterns if (found.fits_24 if pattern == TWO_FOUR else nm.fits(keep, pattern))]
    layout, pattern, stored = smallest_layout((rows, columns), found.nonzeros, fitting, dtype, scheme)

    native = codec.nm_encode(matrix, found, pattern, grid, name) if layout in (NM, BITMASK_24) else None
    if native is not None:
        pattern_bytes, position_mask, values = native
        tensors = {"bitmask": position_mask, "compressed": values} if layout == BITMASK_24 else \
            {"patterns": pattern_bytes, "compressed": values if scheme else values.reshape(-1)}
    else:
        tensors = _encode_numpy(name, matrix, found, keep, layout, pattern, grid, transposed)
    if scheme is not None:
        tensors["weight_scale"] = grid.scale.contiguous()
        if not scheme.symmetric:
            tensors["weight_zero_point"] = grid.zero_point.contiguous()
    if layout != DENSE or scheme is not None:
        tensors["shape"] = torch.tensor([rows, columns], dtype=torch.int64)
    return EncodedLayer(name, layout, (rows, columns), dtype, stored, tensors, pattern, scheme, transposed,
                        found.nonzeros)


def _encode_numpy(name: str, matrix: torch.Tensor, found: codec.Scan, keep: torch.Tensor | None, layout: str,
                  pattern: Pattern, grid: QuantGrid | None, transposed: bool) -> dict[str, torch.Tensor]:
    """A layout's position and value tensors for what the compiled codec does not cover."""
    rows, columns = matrix.shape
    tensors: dict[str, torch.Tensor] = {}
    if layout == BITMASK:
        positions = keep  # codes below need them; unpacked there if not yet
        tensors.update(bitmask.pack(found, columns))
        values = codec.gather(matrix, found)
    else:
        keep = unpack_mask(found.bitmask, columns) if keep is None else keep
        if layout == DENSE:
            positions = None
            values = codec.gather_at(matrix, torch.ones_like(keep), keep)  # -0.0 becomes +0.0
        else:
            positions, index = nm.pack(keep, pattern)
            tensors.update({"bitmask": pack_mask(positions)} if layout == BITMASK_24 else index)
            values = codec.gather_at(matrix, positions, keep)
    if grid is None:
        if layout == DENSE:
            weight = values.view(rows, columns)
            tensors["weight"] = weight.t().contiguous() if transposed else weight
        else:
            tensors["compressed"] = values.view(rows, -1) if layout == BITMASK_24 else values
        return tensors
    if layout == BITMASK and positions is None:
        positions = unpack_mask(found.bitmask, columns)
    scale, zero, view = stored_grid(grid, layout, pattern, (rows, columns), positions)
    values = values.view(view)
    codes = quantize(values, scale, zero, grid.scheme.bits)  # stored zeros get code z, which means 0
    if not torch.equal(dequantize(codes, scale, zero).to(matrix.dtype), values):
        raise SparseLLMError(f"{name}: the weights are not on their quantization grid "
                             "(changed after quantizing?); save with format='dense'")
    per_row = layout in (DENSE, NM)
    tensors["compressed"] = pack_codes(codes.view(rows, -1) if per_row else codes, grid.scheme.bits)
    return tensors
