"""``kernels="auto"``: up to how many tokens the sparse kernel beats the dense path, measured.

The sparse kernels win while a product is bound by reading weights (decoding, small batches); with
many tokens the product becomes bound by arithmetic and the GEMM on decoded blocks wins. Where
that happens depends on the format, the codec, the shape, the CPU and the thread count, so it is
measured once per such key (both paths, a few repeats, growing batches until the dense path wins)
and cached in ``<cache>/kernels/crossover.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from ..logging_utils import logger
from ..models import cache_dir
from . import backend
from .layouts import Layout

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MEASUREMENT = 2  # in the cache's keys: crossovers of an earlier way of measuring are measured again
_memory: dict[str, int] = {}


def _cache_file():
    return cache_dir() / "kernels" / "crossover.json"


def key(layout: Layout, activation_sparsity: float | None, dtype: torch.dtype) -> str:
    active = "none" if activation_sparsity is None else f"{activation_sparsity:.1f}"
    return "/".join([backend.current().name, backend.build_key(), f"m{MEASUREMENT}", str(torch.get_num_threads()),
                     layout.format, layout.codec, "input-major" if layout.input_major else "row-major",
                     f"{layout.out_features}x{layout.in_features}", f"activations-{active}",
                     str(dtype).removeprefix("torch.")])


def _median_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Each run's median time, the runs interleaved: a stall of the machine (a shared VM's can outlast
    a whole block of one path's repeats) then slows both paths, not one."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(layouts: list[Layout], activation_sparsity: float | None, dtype: torch.dtype = torch.float32,
            repeats: int = 5) -> int:
    """The largest batch at which the sparse kernel is faster than the dense path (0: never).

    ``layouts`` are the model's matrices of this key, run in turn so the weights are not all in
    cache, as during decoding. Inputs are ``dtype``, with the given share of zeros (activation sparsity).
    The dense path must win twice in a row: the result is cached for good, and a crossover measured
    too low by one disturbed measurement costs every later token (an activation-sparse 2048 x 2048
    layer cached at 0 ran its one-token products 7x slower on the dense path).
    """
    generator = torch.Generator().manual_seed(0)
    in_features = layouts[0].in_features
    best = 0
    for batch in BATCHES:
        x = torch.randn(batch, in_features, generator=generator)
        if activation_sparsity:
            x[torch.rand(x.shape, generator=generator) < activation_sparsity] = 0
        x = x.to(dtype)
        turn = iter(range(1 << 62))

        def sparse(x=x, turn=turn):
            return backend.linear(layouts[next(turn) % len(layouts)], x, sparse=True)

        def dense(x=x, turn=turn):
            return backend.linear(layouts[next(turn) % len(layouts)], x, sparse=False)

        measurements = (_median_seconds({"sparse": sparse, "dense": dense}, repeats) for _ in range(2))
        if all(seconds["dense"] < seconds["sparse"] for seconds in measurements):  # a second look only if dense won
            break
        best = batch
    return best


def crossover(layouts: list[Layout], activation_sparsity: float | None, dtype: torch.dtype) -> int:
    """The cached crossover for these layouts' key and the inputs' dtype, measured on first use."""
    name = key(layouts[0], activation_sparsity, dtype)
    if name in _memory:
        return _memory[name]
    path = _cache_file()
    stored = json.loads(path.read_text()) if path.exists() else {}
    if name not in stored:
        if backend.current().name == "torch":
            stored[name] = 0  # the fallback decodes anyway: one path
        else:
            started = time.perf_counter()
            stored[name] = measure(layouts, activation_sparsity, dtype)
            logger.info("kernels=auto: sparse kernel up to %d tokens for %s (measured in %.1f s, cached)",
                        stored[name], layouts[0].describe(), time.perf_counter() - started)
        _save(path, stored)
    _memory[name] = stored[name]
    return stored[name]


def _save(path, table: dict) -> None:
    """Write atomically: another process may be reading or writing the same cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # keep what another process added meanwhile
        table = json.loads(path.read_text()) | table
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".crossover-")
    with os.fdopen(handle, "w") as stream:
        json.dump(table, stream, indent=1, sort_keys=True)
    os.replace(temporary, path)
