"""Runtime layouts: how a weight matrix is held in memory for the kernels (see csrc/kernels.h).

A layout is built once, when a model is loaded, from a keep-mask and the kept values (floats, or
integer codes with a scale and zero point per row and group of columns). Columns are padded with
zeros to a multiple of 64 and cut into panels of ``PANEL`` columns stored one after the other, so
that a thread reads one contiguous run per panel and the panel of the input stays in L1. Formats:

- ``dense``: every value;
- ``bitmask``: one bit per weight (LSB first, 64-bit words) plus the kept values packed row by row,
  and the index of each (panel, row)'s first value;
- ``2:4``: exactly two values per group of four columns, and their 2-bit positions in the group;
- ``input_major`` (activation sparsity): the transposed matrix, one row per input feature, so the
  rows of inputs that are zero are never read.

MoE experts (csrc/moe.cpp) have a layout of their own: each expert's weights in panels of
``EXPERT_PANEL`` outputs, input-major (``pack_gate_up``, ``pack_down``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SparseLLMError

FORMATS = ("dense", "bitmask", "2:4")
FLOAT_CODECS = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
CODECS = ("float32", "bfloat16", "float16", "uint8", "uint4")
PANEL = 2048  # columns: the panel of x (8 KiB in fp32) stays in L1 next to the weight stream
ALIGN = 64
PADDING_BYTES = 64  # kernels may read one vector past the last value
EXPERT_PANEL = 16  # csrc/moe.cpp's kPanel: a panel row is 8 gate + 8 up weights, or 16 down weights (64 bytes)


@dataclass
class Quantization:
    """Integer codes dequantize as (code - zero_point) * scale, per row and group of ``group`` columns."""

    bits: int
    group: int  # columns per group; 0 or >= in_features: one group per row
    scale: torch.Tensor  # (out, groups)
    zero_point: torch.Tensor  # (out, groups)

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise SparseLLMError(f"quantized kernels need 2, 4 or 8-bit codes, not {self.bits}")
        if self.group and self.group % ALIGN:
            raise SparseLLMError(f"quantized kernels need groups of a multiple of {ALIGN} columns, not {self.group}")

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """(out, in) codes -> float32 weights (for references and the fallback)."""
        columns = codes.shape[1]
        zero = _per_column(self.zero_point.float(), self.group, columns)
        return (codes.float() - zero) * _per_column(self.scale.float(), self.group, columns)


@dataclass
class Layout:
    """One weight matrix in a kernel layout; the tensors that a format does not use are empty."""

    format: str
    codec: str
    out_features: int
    in_features: int
    rows: int  # matrix rows as stored: out_features, or in_features when input-major
    cols: int  # stored columns, padded to a multiple of 64
    panel: int
    group: int  # quantization group along the stored columns (rows when input-major), 0 if not quantized
    input_major: bool
    values: torch.Tensor
    mask: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    offsets: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))
    scales: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    biases: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def kept(self) -> int:
        """Weights stored (kept, plus the padding of 2:4 groups)."""
        if self.format == "bitmask":
            return int(self.offsets[-1])
        per_column = 0.5 if self.format == "2:4" else 1.0
        return int(self.rows * self.cols * per_column)

    def panels(self) -> list[tuple[int, int]]:
        """(first column, width) of each panel."""
        return [(start, min(self.panel, self.cols - start)) for start in range(0, self.cols, self.panel)]

    def kernel_args(self) -> tuple:
        """The arguments the compiled kernels take (LAYOUT_ARGS in csrc/bindings.cpp)."""
        return (FORMATS.index(self.format), CODECS.index(self.codec), self.rows, self.cols, self.panel,
                self.group, self.input_major, self.values, self.mask, self.offsets, self.positions,
                self.scales, self.biases)

    def describe(self) -> str:
        kind = "input-major " if self.input_major else ""
        return f"{kind}{self.format} {self.codec} {self.out_features}x{self.in_features}"


def padded(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def _pad_columns(matrix: torch.Tensor, cols: int) -> torch.Tensor:
    return matrix if matrix.shape[1] == cols else F.pad(matrix, (0, cols - matrix.shape[1]))


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool, cols a multiple of 64 -> (rows, cols / 64) int64 words, LSB first."""
    rows, cols = keep.shape
    packed = np.packbits(keep.contiguous().numpy(), axis=1, bitorder="little")  # (rows, cols / 8), LSB first
    return torch.from_numpy(packed.view("<i8").copy()).reshape(rows, cols // 64)


def unpack_bits(words: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of ``pack_bits``."""
    rows = words.shape[0]
    as_bytes = words.contiguous().numpy().astype("<i8").view(np.uint8).reshape(rows, -1)
    return torch.from_numpy(np.unpackbits(as_bytes, axis=1, count=cols, bitorder="little")).bool()


def _with_padding(values: torch.Tensor) -> torch.Tensor:
    extra = -(-PADDING_BYTES // values.element_size())
    return torch.cat([values.reshape(-1), values.new_zeros(extra)])


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], 1).reshape(-1)[:count]


def _completed_nibbles() -> np.ndarray:
    """For each byte of a packed mask (two groups of four columns): the byte with each group filled
    up to two kept columns by its first unkept ones, or 0xFF-marked invalid (a group keeps three)."""
    nibbles = np.zeros(16, dtype=np.int16)
    for nibble in range(16):
        filled, bit = nibble, 0
        while bin(filled).count("1") < 2:
            filled |= 0 if filled >> bit & 1 else 1 << bit
            bit += 1
        nibbles[nibble] = filled if bin(nibble).count("1") <= 2 else -1
    table = np.array([nibbles[b & 15] | nibbles[b >> 4] << 4 for b in range(256)], dtype=np.int16)
    return np.where((nibbles[np.arange(256) & 15] < 0) | (nibbles[np.arange(256) >> 4] < 0), -1, table)


_COMPLETED = _completed_nibbles()


def complete_24(keep: torch.Tensor) -> torch.Tensor:
    """Keep exactly two of every four columns: add the first unkept positions of groups with fewer.

    Raises if a group keeps more than two (the matrix is not 2:4).
    """
    cols = keep.shape[1]
    packed = np.packbits(keep.contiguous().numpy(), axis=1, bitorder="little")  # two groups per byte
    filled = _COMPLETED[packed]
    if bool((filled < 0).any()):
        raise SparseLLMError("the weight is not 2:4 sparse: some group of four columns keeps more than two")
    bits = np.unpackbits(filled.astype(np.uint8), axis=1, count=cols, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool)


_SAME_SIZE_INTEGER = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _kept_values(matrix: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """``matrix[keep]`` in row-major order, and the flat indices of ``keep``.

    numpy's flatnonzero and take are several times faster than torch's boolean indexing, which
    matters when a model's layouts are built at load time; bfloat16 goes through a 16-bit view.
    """
    index = np.flatnonzero(keep.contiguous().numpy())
    matrix = matrix.contiguous()
    raw = matrix.view(getattr(torch, np.dtype(_SAME_SIZE_INTEGER[matrix.element_size()]).name)).numpy()
    return torch.from_numpy(raw.reshape(-1)[index]).view(matrix.dtype), index


def _pack_positions(index: np.ndarray) -> torch.Tensor:
    """2-bit in-group positions of the kept values (flat indices into a matrix of a multiple of 4
    columns, two per group, ascending), 16 per 32-bit word."""
    positions = (index & 3).astype(np.uint32).reshape(-1, 16) << (2 * np.arange(16, dtype=np.uint32))
    return torch.from_numpy(np.bitwise_or.reduce(positions, axis=1).view(np.int32))


def build(weight: torch.Tensor, keep: torch.Tensor | None = None, *, format: str = "bitmask",
          quantization: Quantization | None = None, input_major: bool = False, panel: int = PANEL) -> Layout:
    """The layout of an (out, in) matrix: float values, or integer codes with ``quantization``.

    ``keep`` marks the stored weights (default: the non-zero ones); weights outside it must be zero
    (or, for codes, are ignored). ``input_major`` stores the transpose for activation sparsity
    (dense or bitmask; a 2:4 matrix becomes a bitmask there, since its columns are not 2:4).
    """
    if format not in FORMATS:
        raise SparseLLMError(f"unknown kernel format '{format}': use one of {', '.join(FORMATS)}")
    if weight.dim() != 2:
        raise SparseLLMError(f"a kernel layout needs an (out, in) matrix, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    weight = weight.detach().cpu()
    if quantization is None:
        if weight.dtype not in FLOAT_CODECS:
            raise SparseLLMError(f"kernel values must be float32, bfloat16 or float16, not {weight.dtype}")
        codec = FLOAT_CODECS[weight.dtype]
    else:
        codec = "uint8" if quantization.bits == 8 else "uint4"
    keep = (weight != 0) if keep is None else keep.detach().cpu().bool()
    if tuple(keep.shape) != tuple(weight.shape):
        raise SparseLLMError(f"keep-mask shape {tuple(keep.shape)} does not match the weight {tuple(weight.shape)}")
    if format == "dense":
        keep = torch.ones_like(keep)
    if quantization is not None:  # unkept codes: the zero point, so the padding of 2:4 groups dequantizes to 0
        zero_point = _per_column(quantization.zero_point.to(torch.uint8), quantization.group, in_features)
        weight = torch.where(keep, weight.to(torch.uint8), zero_point)
    if input_major:
        weight, keep = weight.t(), keep.t()
        format = "bitmask" if format == "2:4" else format
        panel = padded(out_features)
    rows, columns = weight.shape
    cols = padded(columns)
    weight, keep = _pad_columns(weight, cols), _pad_columns(keep, cols)
    if format == "2:4":
        keep = complete_24(keep)
    panel = max(ALIGN, padded(min(panel, cols)))

    values, masks, offsets, positions = [], [], [], []
    start = 0
    for first in range(0, cols, panel):
        part_keep = keep[:, first : first + panel]
        part = weight[:, first : first + panel]
        if format == "dense":
            values.append(part.reshape(-1))
            continue
        kept, index = _kept_values(part, part_keep)
        values.append(kept)
        if format == "bitmask":
            words = pack_bits(part_keep)
            counts = torch.from_numpy(np.bitwise_count(words.numpy().view(np.uint64)).sum(1, dtype=np.int64))
            masks.append(words.reshape(-1))
            offsets.append(start + torch.cumsum(counts, 0) - counts)
            start += int(counts.sum())
        else:
            positions.append(_pack_positions(index))
    flat = torch.cat(values)
    if codec == "uint4":
        flat = _pack_nibbles(flat)
    elif codec == "uint8":
        flat = flat.to(torch.uint8)
    layout = Layout(format, codec, out_features, in_features, rows, cols, panel, 0, input_major,
                    _with_padding(flat.contiguous()))
    if format == "bitmask":
        layout.mask = torch.cat(masks)
        layout.offsets = torch.cat([*offsets, torch.tensor([start])]).to(torch.int64)
    if format == "2:4":
        layout.positions = torch.cat(positions)
    if quantization is not None:
        layout.group, layout.scales, layout.biases = _scales(quantization, out_features, in_features, cols,
                                                             rows, input_major)
    return layout


def _per_column(grid: torch.Tensor, group: int, columns: int) -> torch.Tensor:
    """(rows, groups) -> (rows, columns): each column gets the value of its group."""
    width = group if group else columns
    index = (torch.arange(columns) // width).clamp_max(grid.shape[1] - 1)
    return grid[:, index]


def _scales(quantization: Quantization, out_features: int, in_features: int, cols: int, rows: int,
            input_major: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    scale = quantization.scale.float()
    bias = -quantization.zero_point.float() * scale  # exact: a float16 scale times an 8-bit integer
    if not input_major:
        group = quantization.group if quantization.group and quantization.group < in_features else cols
        return group, scale.contiguous(), bias.contiguous()
    group = quantization.group if quantization.group and quantization.group < in_features else padded(rows)
    return group, _pad_columns(scale.t(), cols).contiguous(), _pad_columns(bias.t(), cols).contiguous()


def pack_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """(E, 2F, H) -> panels (E, ceil(F / 8), H, 16): panel p, row h = gate rows 8p..8p+7 then up rows
    8p..8p+7 at column h, zeros past the last neuron."""
    num_experts, hidden, width, neurons = gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2, EXPERT_PANEL // 2
    panels = -(-width // neurons)
    gate, up = (F.pad(half, (0, 0, 0, panels * neurons - width)).view(num_experts, panels, neurons, hidden)
                for half in gate_up.chunk(2, dim=1))
    return torch.stack([gate, up], 2).view(num_experts, panels, EXPERT_PANEL, hidden).transpose(2, 3).contiguous()


def unpack_gate_up(panels: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of ``pack_gate_up``: (E, 2F, H) for F = ``width`` neurons."""
    num_experts, count, hidden, _ = panels.shape
    halves = panels.transpose(2, 3).reshape(num_experts, count, 2, EXPERT_PANEL // 2, hidden)
    gate, up = (halves[:, :, half].reshape(num_experts, -1, hidden)[:, :width] for half in (0, 1))
    return torch.cat([gate, up], dim=1)


def pack_down(down: torch.Tensor) -> torch.Tensor:
    """(E, H, F) -> panels (E, ceil(H / 16), F, 16): panel p, row f = down rows 16p..16p+15 at column f."""
    num_experts, hidden, width = down.shape
    panels = -(-hidden // EXPERT_PANEL)
    outputs = F.pad(down, (0, 0, 0, panels * EXPERT_PANEL - hidden))  # zero rows up to whole panels
    return outputs.view(num_experts, panels, EXPERT_PANEL, width).transpose(2, 3).contiguous()


def unpack_down(panels: torch.Tensor, hidden: int) -> torch.Tensor:
    """The inverse of ``pack_down``: (E, H, F) for H = ``hidden`` outputs."""
    num_experts, count, width, _ = panels.shape
    return panels.transpose(2, 3).reshape(num_experts, count * EXPERT_PANEL, width)[:, :hidden].contiguous()
