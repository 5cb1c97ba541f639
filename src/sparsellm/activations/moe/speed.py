"""Decode-time MLP cost: one token through every MLP of a model, dense and MoE side by side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def decode_mlp_seconds(stacks: dict[str, Sequence[nn.Module]], hidden_size: int, repeats: int = 30,
                       dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, float]:
    """Median seconds for one token to pass through each stack of MLPs (e.g. all blocks' MLPs).

    The stacks run interleaved within each repeat, after one warm-up pass each, so they share the
    machine's state; a whole model's MLPs are far larger than the cache, so weights come from
    memory as they do in decoding.
    """
    token = torch.randn(1, 1, hidden_size, generator=torch.Generator().manual_seed(seed)).to(dtype)
    timings: dict[str, list[float]] = {name: [] for name in stacks}
    for repeat in range(repeats + 1):
        for name, modules in stacks.items():
            started = time.perf_counter()
            for module in modules:
                module(token)
            if repeat:
                timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}
