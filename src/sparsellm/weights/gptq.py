"""GPTQ restricted to a sparsity mask: quantize the kept weights of an already pruned matrix.

GPTQ (Frantar et al. 2022) quantizes the columns one by one and spreads each column's rounding
error over the columns not yet quantized through the same inverse-Hessian factor SparseGPT uses.
With a fixed mask it is exactly SparseGPT's sweep with the mask given rather than chosen: a pruned
weight that an update has moved off zero is set back to zero, and that error is compensated too.
So pruned weights stay exactly zero, whatever method chose them.
"""

from __future__ import annotations

import torch

from .base import InputStatistics
from .masks import Pattern
from .quant import LayerQuantizer
from .sparsegpt import SparseGPT


def quantize_masked(weight: torch.Tensor, stats: InputStatistics, quantizer: LayerQuantizer,
                    keep: torch.Tensor | None = None, blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """Quantize the (out, in) ``weight`` where ``keep`` (default: its non-zeros) with GPTQ; the rest is 0."""
    keep = weight != 0 if keep is None else keep
    solver = SparseGPT(blocksize=blocksize, percdamp=percdamp)
    return solver.fasterprune(weight, stats.scaled_hessian().to(weight.device), 0.0, Pattern(), quantizer, keep)
