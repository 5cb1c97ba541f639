"""The pure-PyTorch fallback: the same products on the same layouts, without a compiler.

Used when the C++ kernels cannot be built or fail their self-check, and as the reference the
kernels are checked against. It decodes one panel at a time to a dense float32 block and
multiplies it, so it is as exact as the kernels but not fast.
"""

from __future__ import annotations

import torch

from .layouts import Layout, unpack_bits, unpack_nibbles


def _values(layout: Layout, start: int, count: int) -> torch.Tensor:
    """``count`` stored values from index ``start`` as float32 (integer codes for quantized codecs)."""
    if layout.codec == "uint4":
        first = start // 2
        packed = layout.values[first : first + (count + 3) // 2]
        return unpack_nibbles(packed, count + start % 2)[start % 2 :].float()
    return layout.values[start : start + count].float()


def _keep(layout: Layout, index: int) -> tuple[torch.Tensor, int]:
    """Positions stored in a panel (rows, width) and the index of its first value."""
    first, width = layout.panels()[index]
    rows = layout.rows
    if layout.format == "dense":
        return torch.ones(rows, width, dtype=torch.bool), rows * first
    if layout.format == "bitmask":
        words = layout.mask[rows * first // 64 : rows * (first + width) // 64].reshape(rows, width // 64)
        return unpack_bits(words, width), int(layout.offsets[index * rows])
    start = rows * first // 2
    words = layout.positions[start // 16 : (start + rows * width // 2) // 16].to(torch.int64) & 0xFFFFFFFF
    positions = (words.unsqueeze(1) >> (2 * torch.arange(16))) & 3
    columns = 4 * (torch.arange(width // 2) // 2) + positions.reshape(rows, width // 2)
    keep = torch.zeros(rows, width, dtype=torch.bool)
    keep.scatter_(1, columns, True)
    return keep, start


def decode_panel(layout: Layout, index: int) -> torch.Tensor:
    """One panel of the stored matrix as dense float32 (rows, width), dequantized."""
    first, width = layout.panels()[index]
    keep, start = _keep(layout, index)
    dense = torch.zeros(layout.rows, width)
    dense[keep] = _values(layout, start, int(keep.sum()))
    if layout.group:
        rows, columns = torch.nonzero(keep, as_tuple=True)
        if layout.input_major:
            group = rows // layout.group * layout.cols + first + columns
            scale, bias = layout.scales.reshape(-1)[group], layout.biases.reshape(-1)[group]
        else:
            groups = layout.scales.shape[1]
            group = rows * groups + (first + columns) // layout.group
            scale, bias = layout.scales.reshape(-1)[group], layout.biases.reshape(-1)[group]
        dense[keep] = dense[keep] * scale + bias
    return dense


def decode(layout: Layout) -> torch.Tensor:
    """The whole stored matrix, dense float32 (rows, padded columns)."""
    return torch.cat([decode_panel(layout, index) for index in range(len(layout.panels()))], 1)


def threshold(x: torch.Tensor, value: float | None) -> torch.Tensor:
    """The TEAL sparsifier s(x) = x * 1[|x| > value], compared in float32 as the kernels do (a
    bfloat16 comparison would round ``value`` first)."""
    return x if value is None else x * (x.float().abs() > value)


def gemv(layout: Layout, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T for a row-major layout, float32 (tokens, out_features)."""
    x = torch.nn.functional.pad(x.float(), (0, layout.cols - x.shape[1]))
    y = torch.zeros(x.shape[0], layout.rows)
    for index, (first, width) in enumerate(layout.panels()):
        y += x[:, first : first + width] @ decode_panel(layout, index).t()
    return y


def input_major(layout: Layout, x: torch.Tensor, value: float | None) -> torch.Tensor:
    """y = s(x) W^T for an input-major layout (which stores W^T)."""
    return (threshold(x.float(), value) @ decode(layout))[:, : layout.out_features]


def linear(layout: Layout, x: torch.Tensor, value: float | None = None, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """The layer: y = s(x) W^T + bias with x (..., in_features), in x's dtype."""
    flat = x.reshape(-1, layout.in_features)
    y = input_major(layout, flat, value) if layout.input_major else gemv(layout, threshold(flat.float(), value))
    y = y[:, : layout.out_features]
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], layout.out_features)


def moe_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """csrc/moe.cpp's ``moe_experts`` on unpacked weights, gate_up (E, 2F, H) and down (E, H, F): y[t] =
    sum over t's assignments j with experts[t, j] >= 0 of weights[t, j] * down (silu(gate x) * up x)."""
    output = torch.zeros_like(x)
    for expert in experts.unique().tolist():
        if expert < 0:  # a dropped assignment
            continue
        token, rank = (experts == expert).nonzero(as_tuple=True)
        gate, up = (x[token] @ gate_up[expert].t()).chunk(2, dim=-1)
        output.index_add_(0, token, (torch.nn.functional.silu(gate) * up) @ down[expert].t() * weights[token, rank, None])
    return output
