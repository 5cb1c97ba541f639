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

    Each repeat draws a new token (so MoE layers route it to other experts, as successive decoded
    tokens are) and runs the stacks on it one after the other, after one warm-up repeat. A whole
    model's MLPs are larger than the cache, so weights come from memory as they do in decoding.
    """
    generator = torch.Generator().manual_seed(seed)
    timings: dict[str, list[float]] = {name: [] for name in stacks}
    for repeat in range(repeats + 1):
        token = torch.randn(1, 1, hidden_size, generator=generator).to(dtype)
        for name, modules in stacks.items():
            started = time.perf_counter()
            for module in modules:
                module(token)
            if repeat:
                timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in timings.items()}
