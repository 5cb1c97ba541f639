"""Time and peak memory of attention implementations on random inputs (``sparsellm bench-attention``).

An implementation is named by a spec: ``sdpa`` (PyTorch's fused causal attention, the baseline),
``banded:W`` (the naive way to a window: SDPA with a boolean band mask of W keys, built per call,
as transformers builds its masks), any sparse method (``window:512``, ``bigbird``,
``performer:features=256``), or ``python:FILE:FUNCTION`` (a function of the ``Shape`` returning a
callable of (q, k, v), for peers such as other packages).

Times are interleaved: every repeat runs each implementation once in turn on the same inputs, and
the median is reported. Peak memory is measured in a fresh process per implementation and length:
after one warm-up call on 64 tokens (one-time library set-up), the inputs are made, the kernel's
high-water mark of resident memory is reset (``/proc/self/clear_refs``), the implementation runs
once, and the peak above the resident size just before the call is the extra memory it needed
(inputs excluded, output included). Torch's CPU
allocator hands large blocks straight back to the OS, so resident memory follows the tensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import SparseLLMError
from ..logging_utils import progress
from .base import METHODS, parse_spec

Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    """Attention inputs: (batch, heads, length, head_dim) queries, kv_heads key/value heads."""

    length: int
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    batch: int = 1
    causal: bool = True

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        query = torch.randn(self.batch, self.heads, self.length, self.head_dim, generator=generator)
        key, value = (torch.randn(self.batch, self.kv_heads, self.length, self.head_dim, generator=generator)
                      for _ in range(2))
        return query, key, value


def sdpa_runner(shape: Shape) -> Runner:
    gqa = shape.heads != shape.kv_heads
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal, enable_gqa=gqa)


def banded_runner(shape: Shape, window: int) -> Runner:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        distance = torch.arange(q.shape[2])[:, None] - torch.arange(k.shape[2])
        band = (distance >= 0) & (distance < window) if shape.causal else distance.abs() < window
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=shape.heads != shape.kv_heads)

    return run


def runner(spec: str, shape: Shape) -> Runner:
    """The callable a spec names, for inputs of ``shape``."""
    name, _, rest = spec.partition(":")
    if spec == "sdpa":
        return sdpa_runner(shape)
    if name == "banded":
        try:
            return banded_runner(shape, int(rest))
        except ValueError:
            raise SparseLLMError(f"'{spec}': give the band width as banded:W, e.g. banded:512") from None
    if name == "python":
        path, _, function = rest.rpartition(":")
        module_spec = importlib.util.spec_from_file_location("attention_peer", path)
        if module_spec is None or not os.path.exists(path):
            raise SparseLLMError(f"'{spec}': no Python file {path}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return getattr(module, function)(shape)
    if name in METHODS:
        method = parse_spec(spec)
        return lambda q, k, v: method(q, k, v, causal=shape.causal)
    raise SparseLLMError(f"unknown attention '{spec}': use sdpa, banded:W, {', '.join(sorted(METHODS))} or python:FILE:FUNCTION")


def time_sweep(specs: list[str], shapes: list[Shape], repeats: int = 3) -> list[dict]:
    """Median seconds per (spec, shape), every repeat running each spec once in turn."""
    results = []
    for shape in shapes:
        query, key, value = shape.inputs()
        runners = {spec: runner(spec, shape) for spec in specs}
        seconds: dict[str, list[float]] = {spec: [] for spec in specs}
        with torch.inference_mode():
            for spec in specs:  # warm-up: first-call allocations and thread start-up
                runners[spec](query, key, value)
            for _ in progress(range(repeats), desc=f"length {shape.length}", unit="repeat"):
                for spec in specs:
                    started = time.perf_counter()
                    runners[spec](query, key, value)
                    seconds[spec].append(time.perf_counter() - started)
        results += [{"spec": spec, **asdict(shape), "seconds": statistics.median(seconds[spec]),
                     "all_seconds": seconds[spec]} for spec in specs]
    return results


def peak_memory(spec: str, shape: Shape, threads: int | None = None) -> dict:
    """Extra peak resident memory (MiB) of one call, measured in a fresh Python process."""
    argv = [sys.executable, "-m", "sparsellm.attention.measure", spec, json.dumps(asdict(shape)),
            str(threads or torch.get_num_threads())]
    done = subprocess.run(argv, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": _python_path()})
    if done.returncode != 0:
        lines = (done.stderr.strip() or "no output").splitlines()
        raise SparseLLMError(f"memory measurement of {spec} at {shape.length} failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _python_path() -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))


def _resident_mib(field: str) -> float | None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _measure_in_this_process(spec: str, shape: Shape) -> dict:
    warm_up = replace(shape, length=min(shape.length, 64))
    with torch.inference_mode():  # one-time library set-up (thread pools, kernel caches) is not the call's cost
        runner(spec, warm_up)(*warm_up.inputs())
    query, key, value = shape.inputs()
    run = runner(spec, shape)
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident size (VmHWM) to the current one
        how = "VmHWM after clear_refs"
    except OSError:
        how = "ru_maxrss (a lower bound: the peak before the call may hide part of it)"
    before = _resident_mib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.inference_mode():
        output = run(query, key, value)
    peak = _resident_mib("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"spec": spec, "length": shape.length, "peak_extra_mib": peak - before, "resident_before_mib": before,
            "output_mib": output.numel() * output.element_size() / 2**20, "how": how}


if __name__ == "__main__":  # the child process of peak_memory
    torch.set_num_threads(int(sys.argv[3]))
    print(json.dumps(_measure_in_this_process(sys.argv[1], Shape(**json.loads(sys.argv[2])))))
