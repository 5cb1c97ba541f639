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


def quantize_masked(weights: list[torch.Tensor], stats: InputStatistics, quantizers: list[LayerQuantizer],
                    keeps: list[torch.Tensor] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> list[torch.Tensor]:
    """Quantize (out, in) matrices that share one input where ``keeps`` (default: their non-zeros) with GPTQ.

    The matrices are stacked row-wise into one sweep, as SparseGPT does; everything outside ``keeps``
    comes back exactly 0, and each quantizer holds its layer's grids.
    """
    keeps = [w != 0 for w in weights] if keeps is None else keeps
    stacked = torch.cat(weights)
    quantizer = LayerQuantizer.stack(quantizers)
    solver = SparseGPT(blocksize=blocksize, percdamp=percdamp)
    result = solver.fasterprune(stacked, stats.scaled_hessian().to(stacked.device), [0.0] * len(weights), Pattern(),
                                [w.shape[0] for w in weights], quantizer, torch.cat(keeps))
    quantizer.split_into(quantizers)
    return list(result.split([w.shape[0] for w in weights]))
