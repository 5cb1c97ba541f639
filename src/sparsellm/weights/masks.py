"""Sparsity patterns and the pure functions that turn importance scores into masks.

A mask is a bool tensor shaped like the weight, True where the weight is kept. Scores are higher
for weights that matter more. Counts are exact: a layer at sparsity s over n weights prunes
``round(s * n)`` of them, and where the comparison group (a row, a 128-column block) cannot hold an
exact share, the remainder is spread deterministically over the groups (see ``split_count``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import SparseLLMError


@dataclass(frozen=True)
class Pattern:
    """``unstructured``, or N:M: N weights kept in every M consecutive inputs of a row."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        """The sparsity an N:M pattern implies (1 - N/M)."""
        return 1.0 - self.n / self.m if self.is_nm else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        if isinstance(text, Pattern):
            return text
        if text == "unstructured":
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not match:
            raise SparseLLMError(f"unknown pattern '{text}': use unstructured or N:M such as 2:4")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise SparseLLMError(f"pattern {n}:{m} needs 0 < N < M (N weights kept out of every M)")
        return cls(n, m)

    def check_width(self, columns: int, layer: str = "a layer") -> None:
        if self.is_nm and columns % self.m:
            raise SparseLLMError(f"pattern {self}: {layer} has {columns} inputs, not divisible by M={self.m}")


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= float(sparsity) < 1.0:
        raise SparseLLMError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def split_count(fraction: float, sizes: list[int]) -> list[int]:
    """How many to prune in each group so the total is exactly round(fraction * sum(sizes)).

    Group i prunes round(f * C_i) - round(f * C_{i-1}) with C the cumulative sizes, so each group
    is within one of its exact share and the total is exact.
    """
    counts, done, cumulative = [], 0, 0
    for size in sizes:
        cumulative += size
        target = round(fraction * cumulative)
        counts.append(min(max(target - done, 0), size))
        done += counts[-1]
    return counts


def apportion(shares: Sequence[float], weights: Sequence[int], caps: Sequence[int], total: int) -> list[int]:
    """Whole units per group, each near its (fractional) share, so that sum(units * weights) == total.

    Largest remainders (Hamilton): take the floor of every share, then hand the budget still
    missing to the groups with the largest fractional parts, one unit each, in rounds (or take
    units back from the smallest ones when over). A group never goes below 0 or above its cap.
    With unit weights and shares summing to ``total``, every group is within one unit of its share
    and the total is exact; with unequal weights the total is the closest the groups allow.
    """
    units = [min(max(math.floor(share), 0), cap) for share, cap in zip(shares, caps, strict=True)]
    remainder = [share - unit for share, unit in zip(shares, units, strict=True)]
    missing = total - sum(u * w for u, w in zip(units, weights, strict=True))
    order = sorted(range(len(units)), key=lambda i: (-remainder[i], i))
    while missing != 0:
        step = 1 if missing > 0 else -1
        changed = False
        for i in order if step > 0 else reversed(order):
            if 0 <= units[i] + step <= caps[i] and abs(missing - step * weights[i]) < abs(missing):
                units[i] += step
                missing -= step * weights[i]
                changed = True
                if missing == 0 or (missing > 0) != (step > 0):
                    break
        if not changed:
            break
    return units


def prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask of a tensor with exactly ``count`` lowest-scoring entries pruned."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        keep[torch.topk(scores.flatten(), count, largest=False, sorted=False).indices] = False
    return keep.view_as(scores)


def prune_lowest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep-mask pruning ``counts[r]`` lowest-scoring entries of each row r."""
    most = int(counts.max()) if counts.numel() else 0
    keep = torch.ones_like(scores, dtype=torch.bool)
    if most == 0:
        return keep
    lowest = torch.topk(scores, most, dim=1, largest=False, sorted=True).indices
    rank = torch.arange(most, device=scores.device).unsqueeze(0)
    drop = rank < counts.to(scores.device).unsqueeze(1)  # counts differ by row by at most one
    keep.scatter_(1, lowest, ~drop)
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Prune the lowest ``round(sparsity * numel)`` scores, over the whole matrix or row by row."""
    if not per_row:
        return prune_lowest(scores, round(sparsity * scores.numel()))
    rows, columns = scores.shape
    counts = torch.tensor(split_count(sparsity, [columns] * rows))
    return prune_lowest_per_row(scores, counts)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns of each row."""
    rows, columns = scores.shape
    if columns % m:
        raise SparseLLMError(f"pattern {n}:{m}: {columns} columns are not divisible by {m}")
    groups = scores.reshape(rows, columns // m, m)
    kept = torch.topk(groups, n, dim=2, sorted=False).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, kept, True)
    return keep.reshape(rows, columns)


def pattern_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool = False) -> torch.Tensor:
    """The keep-mask for a pattern: N:M groups, or the unstructured lowest scores."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, sparsity, per_row=per_row)


def gradual_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """The keep-mask on the way to a pattern, for sparsity that grows during training.

    Unstructured: the lowest ``round(sparsity * numel)`` scores. N:M: only weights that the final
    N:M mask would drop (the M-N lowest of each group) are candidates, and the lowest
    ``round(sparsity * numel)`` of them are pruned, so at ``sparsity = 1 - N/M`` the mask is exactly
    ``nm_mask`` and before that every group already respects it.
    """
    if not pattern.is_nm:
        return unstructured_mask(scores, sparsity)
    final = nm_mask(scores, pattern.n, pattern.m)
    count = min(round(sparsity * scores.numel()), int((~final).sum()))
    return prune_lowest(scores.masked_fill(final, float("inf")), count)
