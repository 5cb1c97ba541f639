"""Weight-only integer quantization: one grid (scale, zero point) per output row and group of inputs.

A weight w of row r and input column c maps to the integer code

    q = clamp(round(w / s[r, g]) + z[r, g], 0, 2^bits - 1),    g = c // group_size

and back to (q - z) * s. Symmetric schemes fix z = 2^(bits-1) and s = max|w| / (2^(bits-1) - 1);
asymmetric ones stretch [min(w, 0), max(w, 0)] over all 2^bits codes. Grids are fitted on the
kept weights only, so pruned zeros do not widen the range, and pruned weights stay exactly zero
(they are never stored as codes). Scales are rounded to float16 when they are fitted, so the
dequantized values a model computes with are exactly the ones a compact checkpoint rebuilds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import SparseLLMError

BITS = (2, 4, 8)
OBSERVERS = ("minmax", "mse")
# the "mse" observer: ranges shrunk by 1 - i / 100 for i < 80, as GPTQ's, scored by sum |q - w|^2.4
MSE_SHRINK_STEPS, MSE_GRID, MSE_NORM = 80, 100, 2.4
SCALE_DTYPE = torch.float16
GRID_ATTRIBUTE = "quantization_grid"  # set on a module whose weight is quantized
_SMALLEST_SCALE = torch.finfo(SCALE_DTYPE).tiny


@dataclass(frozen=True)
class QuantScheme:
    """How weights are quantized: ``bits`` per code, ``group_size`` inputs per grid (0: one grid per row)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    observer: str = "minmax"  # how ranges are fitted: "minmax", or "mse" (the clipping with least error)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise SparseLLMError(f"--bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size < 0:
            raise SparseLLMError(f"--group-size must be 0 (per channel) or positive, got {self.group_size}")
        if self.observer not in OBSERVERS:
            raise SparseLLMError(f"--quant-observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}")

    @property
    def levels(self) -> int:
        return 2**self.bits

    def groups(self, columns: int) -> int:
        return -(-columns // self.group_size) if self.group_size else 1

    def group_columns(self, columns: int) -> int:
        """Input columns per grid for a matrix of this width."""
        return min(self.group_size, columns) if self.group_size else columns

    def describe(self) -> str:
        grouping = f"group {self.group_size}" if self.group_size else "per channel"
        observer = "" if self.observer == "minmax" else f" {self.observer}"
        return f"{self.bits}-bit {grouping} {'sym' if self.symmetric else 'asym'}{observer}"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_compressed_tensors(self) -> dict:
        """The ``weights`` quantization arguments of the compressed-tensors convention."""
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "strategy": "group" if self.group_size else "channel",
                "group_size": self.group_size or None, "dynamic": False, "actorder": None,
                "observer": self.observer}


@dataclass
class QuantGrid:
    """The fitted grids of one (out, in) matrix: ``scale`` (float16) and ``zero_point`` (uint8), (rows, groups)."""

    scheme: QuantScheme
    scale: torch.Tensor
    zero_point: torch.Tensor

    def expand(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of every weight, as float32 (rows, columns) matrices."""
        width = self.scheme.group_columns(columns)
        scale = self.scale.float().repeat_interleave(width, dim=1)[:, :columns]
        zero = self.zero_point.float().repeat_interleave(width, dim=1)[:, :columns]
        return scale, zero


def fit_grid(values: torch.Tensor, scheme: QuantScheme, keep: torch.Tensor | None = None,
             group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scales and zero points for each row and group of ``group_size`` columns of ``values``.

    Only entries where ``keep`` is True count. Returns (scale float16, zero_point uint8), (rows, groups).
    """
    rows, columns = values.shape
    width = group_size or scheme.group_columns(columns)
    groups = -(-columns // width)
    padded = torch.zeros(rows, groups * width, dtype=torch.float32, device=values.device)
    padded[:, :columns] = values
    counted = torch.zeros_like(padded, dtype=torch.bool)
    counted[:, :columns] = True if keep is None else keep
    blocks = padded.view(rows, groups, width)
    counted = counted.view(rows, groups, width)
    kept = torch.where(counted, blocks, 0.0)
    low, high = kept.amin(-1).clamp_max(0.0), kept.amax(-1).clamp_min(0.0)
    scale, zero = _range_grid(low, high, scheme)
    if scheme.observer == "mse":
        best = _grid_error(kept, counted, scale, zero, scheme)
        for step in range(1, MSE_SHRINK_STEPS):
            shrink = 1 - step / MSE_GRID
            candidate_scale, candidate_zero = _range_grid(low * shrink, high * shrink, scheme)
            error = _grid_error(kept, counted, candidate_scale, candidate_zero, scheme)
            better = error < best
            best = torch.where(better, error, best)
            scale = torch.where(better, candidate_scale, scale)
            zero = torch.where(better, candidate_zero, zero)
    return scale, zero


def _range_grid(low: torch.Tensor, high: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(float16 scale, uint8 zero point) that span [low, high] (low <= 0 <= high) with the scheme's codes."""
    if scheme.symmetric:
        scale = torch.maximum(-low, high) / (scheme.levels // 2 - 1)
    else:
        scale = (high - low) / (scheme.levels - 1)
    scale = torch.where(scale > 0, scale, 1.0).clamp(_SMALLEST_SCALE, torch.finfo(SCALE_DTYPE).max)
    scale = scale.to(SCALE_DTYPE)
    if scheme.symmetric:
        zero = torch.full_like(scale, scheme.levels // 2, dtype=torch.uint8)
    else:
        zero = torch.round(-low / scale.float()).clamp(0, scheme.levels - 1).to(torch.uint8)
    return scale, zero


def _grid_error(values: torch.Tensor, counted: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                scheme: QuantScheme) -> torch.Tensor:
    """sum |dequantize(quantize(v)) - v|^MSE_NORM over the counted entries of each (row, group)."""
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    error = (dequantize(quantize(values, scale, zero, scheme.bits), scale, zero) - values).abs_().pow_(MSE_NORM)
    return error.masked_fill_(~counted, 0.0).sum(-1)


def quantize(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (uint8) of ``values`` on the grid; scale and zero point broadcast against values."""
    codes = torch.round(values.float() / scale.float()) + zero_point.float()
    return codes.clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """float32 values of codes: (q - z) * s. The one formula both quantizing and loading use."""
    return (codes.float() - zero_point.float()) * scale.float()


def quantize_matrix(weight: torch.Tensor, scheme: QuantScheme,
                    keep: torch.Tensor | None = None) -> tuple[torch.Tensor, QuantGrid]:
    """Round-to-nearest quantization of an (out, in) matrix; entries outside ``keep`` become exactly 0."""
    keep = weight != 0 if keep is None else keep
    scale, zero = fit_grid(weight, scheme, keep)
    grid = QuantGrid(scheme, scale, zero)
    scales, zeros = grid.expand(weight.shape[1])
    dequantized = dequantize(quantize(weight, scales, zeros, scheme.bits), scales, zeros)
    return dequantized.masked_fill_(~keep, 0.0), grid


class LayerQuantizer:
    """Grids fitted group by group during a column sweep (GPTQ, joint SparseGPT), then read with ``grid()``.

    Per-channel schemes fit once on the whole matrix; grouped schemes fit each group of columns
    when the sweep reaches its first column, on the weights as updated so far.
    """

    def __init__(self, scheme: QuantScheme, rows: int, columns: int, device: torch.device | str = "cpu"):
        self.scheme = scheme
        self.columns = columns
        self.group_size = scheme.group_columns(columns)
        self.per_channel = scheme.group_size == 0
        groups = scheme.groups(columns)
        self.scale = torch.ones(rows, groups, dtype=SCALE_DTYPE, device=device)
        self.zero_point = torch.zeros(rows, groups, dtype=torch.uint8, device=device)

    def fit(self, column: int, values: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Fit the grid of the group that starts at ``column`` on ``values`` (its columns, rows x width)."""
        group = column // self.group_size
        scale, zero = fit_grid(values, self.scheme, keep, group_size=values.shape[1])
        self.scale[:, group] = scale[:, 0]
        self.zero_point[:, group] = zero[:, 0]

    def quantize(self, column_values: torch.Tensor, column: int) -> torch.Tensor:
        """Dequantized values of one column on its group's grid.

        The same float operations as ``dequantize(quantize(...))``, fused for the per-column loop.
        """
        group = column // self.group_size
        scale, zero = self.scale[:, group].float(), self.zero_point[:, group].float()
        codes = torch.round(column_values.float() / scale).add_(zero).clamp_(0, self.scheme.levels - 1)
        return codes.sub_(zero).mul_(scale)

    def grid(self) -> QuantGrid:
        return QuantGrid(self.scheme, self.scale.cpu(), self.zero_point.cpu())

    @classmethod
    def stack(cls, quantizers: list[LayerQuantizer]) -> LayerQuantizer:
        """One quantizer for the row-wise stack of several layers' matrices (they share a column sweep)."""
        first = quantizers[0]
        return cls(first.scheme, sum(q.scale.shape[0] for q in quantizers), first.columns, first.scale.device)

    def split_into(self, quantizers: list[LayerQuantizer]) -> None:
        """Hand each stacked layer its rows of the fitted grids."""
        start = 0
        for quantizer in quantizers:
            rows = quantizer.scale.shape[0]
            quantizer.scale.copy_(self.scale[start : start + rows])
            quantizer.zero_point.copy_(self.zero_point[start : start + rows])
            start += rows


def attach_grid(module: nn.Module, grid: QuantGrid | None) -> None:
    """Remember a layer's grid on the module, so a compact save can store codes instead of floats."""
    if grid is None:
        if hasattr(module, GRID_ATTRIBUTE):
            delattr(module, GRID_ATTRIBUTE)
    else:
        setattr(module, GRID_ATTRIBUTE, grid)


def grid_of(module: nn.Module) -> QuantGrid | None:
    return getattr(module, GRID_ATTRIBUTE, None)


def round_to_nearest(model: nn.Module, scheme: QuantScheme) -> int:
    """Quantize every decoder-block linear layer of ``model`` in place without data; pruned zeros stay zero.

    For checkpoints pruned earlier; ``sparsellm.prune(..., quantization=...)`` is better (GPTQ-style
    error compensation on calibration data). Returns the number of layers quantized.
    """
    from ..models import decoder_blocks, linear_layers, set_weight_matrix, weight_matrix

    prefix, blocks = decoder_blocks(model)
    count = 0
    for index, block in enumerate(blocks):
        for module in linear_layers(block, f"{prefix}.{index}").values():
            quantized, grid = quantize_matrix(weight_matrix(module), scheme)
            set_weight_matrix(module, quantized)
            attach_grid(module, grid)
            count += 1
    return count
