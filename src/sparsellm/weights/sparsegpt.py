"""SparseGPT (Frantar & Alistarh 2023): prune with an OBS weight update, column block by column block.

Given H = 2/n sum X X^T of the layer's inputs, each pruned weight's error is spread over the
not-yet-processed weights of its row through the upper Cholesky factor U of H^-1:

    err_i   = (w_i - q_i) / U_ii
    W[:, j] -= err_i * U_ij          for j > i

Masks are chosen per block of 128 columns from w^2 / U_ii^2 on the already-updated weights
(unstructured: the block's lowest scores; N:M: per row, at every M-th column). Updates inside a
block are applied immediately; updates to later blocks are deferred and applied as one matrix
product (the "lazy batch" trick).

Joint sparsity + quantization (the paper's joint mode): with a ``LayerQuantizer`` each kept weight
is replaced by its grid value q inside the sweep, so err_i also carries the rounding error and the
OBS update compensates for it. Given a fixed ``keep`` mask instead of a sparsity, the same sweep is
GPTQ restricted to the kept weights (see ``gptq.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SparseLLMError
from ..logging_utils import logger
from .base import HESSIAN, InputStatistics, PruningMethod, register
from .masks import Pattern, prune_lowest, prune_lowest_per_row, split_count
from .quant import LayerQuantizer


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, raising the dampening tenfold while H is not PD."""
    diagonal_mean = torch.mean(torch.diag(hessian))
    while True:
        damped = hessian.clone()
        damped.diagonal().add_(percdamp * diagonal_mean)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if info == 0:
                return upper
        if percdamp >= 10:
            raise SparseLLMError("SparseGPT: the Hessian is singular even with dampening 10x its mean diagonal")
        logger.warning("SparseGPT: Hessian not positive definite with dampening %.3g; retrying with %.3g",
                       percdamp, percdamp * 10)
        percdamp *= 10


@register
@dataclass
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    needs = frozenset({HESSIAN})
    joint_quantization = True
    blocksize: int = 128
    percdamp: float = 0.01

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float,
              pattern: Pattern, quantizer: LayerQuantizer | None = None) -> torch.Tensor:
        return self.fasterprune(weight, stats.scaled_hessian().to(weight.device), sparsity, pattern, quantizer)

    def fasterprune(self, weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern,
                    quantizer: LayerQuantizer | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Prune (and quantize, with a quantizer) ``weight``; ``keep`` fixes the mask instead of choosing one."""
        W = weight.float()
        rows, columns = W.shape
        H = hessian.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Hinv = inverse_hessian_factor(H, self.percdamp)

        # N:M groups and quantization groups must not straddle column blocks
        unit = math.lcm(pattern.m if pattern.is_nm else 1,
                        quantizer.group_size if quantizer is not None and not quantizer.per_channel else 1)
        blocksize = max(unit, self.blocksize // unit * unit)
        if quantizer is not None and quantizer.per_channel:  # as the reference: one grid from the dense row
            quantizer.fit(0, W, keep)
        starts = list(range(0, columns, blocksize))
        block_counts = split_count(sparsity, [rows * (min(s + blocksize, columns) - s) for s in starts])

        for i1, prune_count in zip(starts, block_counts, strict=False):
            i2 = min(i1 + blocksize, columns)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            if keep is not None:
                pruned = ~keep[:, i1:i2]
            elif pattern.is_nm:
                pruned = torch.zeros_like(W1, dtype=torch.bool)
            else:
                pruned = ~prune_lowest(W1.square() / d.square().unsqueeze(0), prune_count)

            for i in range(i2 - i1):
                if keep is None and pattern.is_nm and i % pattern.m == 0:
                    group = W1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square().unsqueeze(0)
                    drop = torch.full((rows,), pattern.m - pattern.n, device=W.device)
                    pruned[:, i : i + pattern.m] = ~prune_lowest_per_row(group, drop)
                if quantizer is not None and not quantizer.per_channel and (i1 + i) % quantizer.group_size == 0:
                    width = quantizer.group_size
                    quantizer.fit(i1 + i, W1[:, i : i + width], ~pruned[:, i : i + width])
                w = W1[:, i]
                q = w.masked_fill(pruned[:, i], 0.0)
                if quantizer is not None:
                    q = quantizer.quantize(q, i1 + i).masked_fill_(pruned[:, i], 0.0)
                err = (w - q) / d[i]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                W1[:, i] = q
                Err1[:, i] = err

            W[:, i1:i2] = W1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        return W
