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
OBS update compensates for it. Given a fixed ``keep`` mask instead of sparsities, the same sweep is
GPTQ restricted to the kept weights (see ``gptq.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SparseLLMError
from ..logging_utils import logger
from .base import HESSIAN, InputStatistics, PruningMethod, register
from .masks import Pattern, nm_mask, prune_lowest, prune_lowest_per_row, split_count
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
    calibration_inputs: str = "pruned"

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: float,
              pattern: Pattern, quantizer: LayerQuantizer | None = None) -> torch.Tensor:
        return self.fasterprune(weight, stats.scaled_hessian().to(weight.device), [sparsity], pattern,
                                quantizer=quantizer)

    def prune_group(self, weights: list[torch.Tensor], stats: InputStatistics | None, sparsities: list[float],
                    pattern: Pattern, quantizers: list[LayerQuantizer] | None = None) -> list[torch.Tensor]:
        # Layers that read the same input (q/k/v, gate/up) share H: stacking their rows gives one
        # column sweep instead of several; rows never interact, and masks stay per layer.
        stacked = torch.cat(weights)
        quantizer = LayerQuantizer.stack(quantizers) if quantizers else None
        pruned = self.fasterprune(stacked, stats.scaled_hessian().to(stacked.device), sparsities, pattern,
                                  [w.shape[0] for w in weights], quantizer)
        if quantizer is not None:
            quantizer.split_into(quantizers)
        return list(pruned.split([w.shape[0] for w in weights]))

    def fasterprune(self, weight: torch.Tensor, hessian: torch.Tensor, sparsities: list[float],
                    pattern: Pattern, segments: list[int] | None = None, quantizer: LayerQuantizer | None = None,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
        """Prune ``weight`` (rows = the stacked ``segments``, one per layer) given H = 2/n sum X X^T.

        With a ``quantizer`` kept weights are quantized in the sweep; ``keep`` fixes the mask.
        """
        W = weight.float()
        rows, columns = W.shape
        segments = segments or [rows]
        H = hessian.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Hinv = inverse_hessian_factor(H, self.percdamp)

        # N:M groups and quantization groups must not straddle column blocks (nor sub-blocks)
        unit = math.lcm(pattern.m if pattern.is_nm else 1,
                        quantizer.group_size if quantizer is not None and not quantizer.per_channel else 1)
        blocksize = max(unit, self.blocksize // unit * unit)
        if quantizer is not None and quantizer.per_channel:  # as the reference: one grid from the dense row
            quantizer.fit(0, W, keep)
        starts = list(range(0, columns, blocksize))
        widths = [min(s + blocksize, columns) - s for s in starts]
        # Exact per-layer counts: each layer's share of every block, summing to round(s * numel).
        counts = [split_count(s, [r * w for w in widths]) for r, s in zip(segments, sparsities, strict=True)]
        row_starts = [sum(segments[:k]) for k in range(len(segments))]

        for b, i1 in enumerate(starts):
            i2 = i1 + widths[b]
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            pruned = torch.zeros_like(W1, dtype=torch.bool)
            if keep is not None:
                pruned = ~keep[:, i1:i2]
            elif not pattern.is_nm:
                scores = W1.square() / d.square().unsqueeze(0)
                for r0, r, layer_counts in zip(row_starts, segments, counts, strict=True):
                    pruned[r0 : r0 + r] = ~prune_lowest(scores[r0 : r0 + r], layer_counts[b])
            self._sweep(W1, Err1, Hinv1, pruned, pattern if keep is None else Pattern(), unit, i1, quantizer)
            W[:, i1:i2] = W1
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
        return W

    def _sweep(self, W1: torch.Tensor, Err1: torch.Tensor, Hinv1: torch.Tensor, pruned: torch.Tensor,
               pattern: Pattern, unit: int = 1, first_column: int = 0,
               quantizer: LayerQuantizer | None = None) -> None:
        """The sequential OBS updates inside one column block, in place.

        Updates reach only the next ``SUBBLOCK`` columns at once; the rest of the block gets them
        as one matrix product per sub-block (the lazy-batch idea one level down: narrower rank-1
        updates stay in cache). N:M masks are chosen at every M-th column on updated weights; a
        quantization group's grid is fitted at its first column, when all its columns are current
        (sub-blocks are multiples of ``unit``, so groups never straddle them).
        """
        d = torch.diag(Hinv1)
        width = W1.shape[1]
        step = max(unit, SUBBLOCK // unit * unit)
        for s1 in range(0, width, step):
            s2 = min(s1 + step, width)
            for i in range(s1, s2):
                if pattern.is_nm and i % pattern.m == 0:
                    group = W1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square().unsqueeze(0)
                    drop = torch.full((W1.shape[0],), pattern.m - pattern.n, device=W1.device)
                    pruned[:, i : i + pattern.m] = ~prune_lowest_per_row(group, drop)
                column = first_column + i
                if quantizer is not None and not quantizer.per_channel and column % quantizer.group_size == 0:
                    span = slice(i, i + quantizer.group_size)
                    kept = ~pruned[:, span]
                    if pattern.is_nm:  # N:M masks come later in the group: fit on the ones its scores foretell
                        scores = W1[:, span].square() / d[span].square().unsqueeze(0)
                        kept = nm_mask(scores, pattern.n, pattern.m)
                    quantizer.fit(column, W1[:, span], kept)
                w = W1[:, i]
                q = w.masked_fill(pruned[:, i], 0.0)
                if quantizer is not None:
                    q = quantizer.quantize(q, column).masked_fill_(pruned[:, i], 0.0)
                err = (w - q) / d[i]
                W1[:, i:s2] -= err.unsqueeze(1) * Hinv1[i, i:s2].unsqueeze(0)
                W1[:, i] = q
                Err1[:, i] = err
            W1[:, s2:].addmm_(Err1[:, s1:s2], Hinv1[s1:s2, s2:], alpha=-1)


SUBBLOCK = 32
