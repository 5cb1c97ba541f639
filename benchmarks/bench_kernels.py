"""Sparse CPU kernels vs PyTorch's dense F.linear on Llama-7B projection shapes (issue 4).

Every variant runs from a ring of copies of its weights larger than the caches, one copy per call,
so weights come from memory as they do during decoding. Variants run interleaved (one pass over
the ring each, in turn, repeated) and the table reports medians: milliseconds per product, the
ratio to the faster of torch float32 / bfloat16, the ratio to sparsellm's own dense bfloat16
kernel (the share due to sparsity), and the bytes of weights read per second.

    flock /tmp/sparsellm-heavy.lock python benchmarks/bench_kernels.py --threads 2 --batch 1 --batch 16
    flock /tmp/sparsellm-heavy.lock python benchmarks/bench_kernels.py --threads 2 --backend avx2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from sparsellm.kernels import SparseLinear, use_backend

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): q/o, gate/up, down of Llama-7B
RING_BYTES = 1 << 30


def pruned_weight(shape, sparsity: float, pattern: str, generator) -> torch.Tensor:
    weight = torch.randn(shape, generator=generator)
    if pattern == "2:4":
        groups = weight.view(shape[0], -1, 4)
        drop = groups.abs().topk(2, -1, largest=False).indices
        return groups.scatter(-1, drop, 0.0).view(shape)
    if sparsity:
        weight[torch.rand(shape, generator=generator) < sparsity] = 0
    return weight


def ring_of(layer: SparseLinear) -> list[SparseLinear]:
    """Copies of a layer whose layouts together exceed RING_BYTES."""
    count = max(2, -(-RING_BYTES // layer.layout.nbytes))
    copies = []
    for _ in range(count):
        clone = copy.copy(layer)
        clone.layout = replace(layer.layout, **{k: v.clone() for k, v in layer.layout.tensors.items()})
        copies.append(clone)
    return copies


def tensor_ring(weight: torch.Tensor) -> list[torch.Tensor]:
    count = max(2, -(-RING_BYTES // (weight.numel() * weight.element_size())))
    return [weight.clone() for _ in range(count)]


def variants(shape, generator, dispatch: str, inputs: torch.dtype):
    """name -> (one call per ring element, the ring, whether x has 50 % zeros, the dtype x is given in)."""
    half = pruned_weight(shape, 0.5, "unstructured", generator)
    dense = torch.randn(shape, generator=generator)
    table = {}
    table["torch fp32"] = (lambda w, x: F.linear(x, w), tensor_ring(dense), False, torch.float32)
    table["torch bf16"] = (lambda w, x: F.linear(x, w), tensor_ring(dense.to(torch.bfloat16)), False, torch.bfloat16)

    def layer(weight, form, threshold=None, keep_dispatch=True):
        built = SparseLinear.from_dense(weight.to(torch.bfloat16), format=form, dtype=None, threshold=threshold,
                                        dispatch=dispatch if keep_dispatch else "sparse")
        return ring_of(built)

    run = lambda layer, x: layer(x)  # noqa: E731
    table["sparsellm dense bf16"] = (run, layer(dense, "dense", keep_dispatch=False), False, inputs)
    table["bitmask 50%"] = (run, layer(half, "bitmask"), False, inputs)
    table["bitmask 70%"] = (run, layer(pruned_weight(shape, 0.7, "unstructured", generator), "bitmask"), False, inputs)
    table["2:4"] = (run, layer(pruned_weight(shape, 0.5, "2:4", generator), "2:4"), False, inputs)
    table["activations 50%"] = (run, layer(dense, "dense", threshold=0.0), True, inputs)
    table["bitmask 50% + act. 50%"] = (run, layer(half, "bitmask", threshold=0.0), True, inputs)
    return table


def nbytes(item) -> int:
    return item.numel() * item.element_size() if isinstance(item, torch.Tensor) else item.layout.nbytes


def measure(shape, batch: int, repeats: int, generator, dispatch: str, inputs: torch.dtype) -> list[dict]:
    table = variants(shape, generator, dispatch, inputs)
    x = torch.randn(batch, shape[1], generator=generator)
    sparse_x = x * (torch.rand(x.shape, generator=generator) >= 0.5)
    given = {(zeros, dtype): (sparse_x if zeros else x).to(dtype) for zeros in (False, True)
             for dtype in (torch.float32, torch.bfloat16)}
    timings: dict[str, list[float]] = {name: [] for name in table}
    with torch.no_grad():
        for call, ring, zeros, dtype in table.values():  # warm up (and measure auto's crossover)
            call(ring[0], given[zeros, dtype])
        for _ in range(repeats):
            for name, (call, ring, zeros, dtype) in table.items():
                started = time.perf_counter()
                for item in ring:
                    call(item, given[zeros, dtype])
                timings[name].append((time.perf_counter() - started) / len(ring))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    baseline = min(medians["torch fp32"], medians["torch bf16"])
    rows = []
    for name, (_, ring, zeros, _) in table.items():
        seconds = medians[name]
        read = nbytes(ring[0]) * (0.5 if zeros and batch == 1 else 1.0)  # rows of zero inputs are skipped
        rows.append({"shape": f"{shape[0]}x{shape[1]}", "batch": batch, "variant": name, "ms": seconds * 1e3,
                     "vs_torch": baseline / seconds, "vs_own_dense": medians["sparsellm dense bf16"] / seconds,
                     "GB_per_s": read / seconds / 1e9, "bytes_per_weight": nbytes(ring[0]) / (shape[0] * shape[1])})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, action="append", help="tokens per product (repeatable; default 1)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", default="auto", help="auto, amx, avx512, avx2 or torch")
    parser.add_argument("--dispatch", default="auto", choices=["auto", "sparse"],
                        help="auto: past the measured crossover the layers use the dense GEMM path")
    parser.add_argument("--shape", action="append", help="OUTxIN (repeatable; default the three Llama-7B shapes)")
    parser.add_argument("--inputs", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the inputs given to sparsellm's layers (torch bf16 always gets bfloat16)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shape] if args.shape else SHAPES
    generator = torch.Generator().manual_seed(0)
    rows = []
    with use_backend(args.backend) as chosen:
        print(f"backend {chosen.name} ({chosen.reason}), {args.threads} threads, torch {torch.__version__}, "
              f"ring >= {RING_BYTES >> 20} MiB per variant, medians of {args.repeats} interleaved rounds, "
              f"sparsellm inputs {args.inputs}, dispatch {args.dispatch}", flush=True)
        for batch in args.batch or [1]:
            print("\n| shape | batch | variant | bytes/weight | ms | vs torch | vs own dense bf16 | GB/s |")
            print("|---|---|---|---|---|---|---|---|")
            for shape in shapes:
                for row in measure(shape, batch, args.repeats, generator, args.dispatch, getattr(torch, args.inputs)):
                    rows.append(row | {"backend": chosen.name, "threads": args.threads})
                    print(f"| {row['shape']} | {batch} | {row['variant']} | {row['bytes_per_weight']:.3f} | "
                          f"{row['ms']:.3f} | {row['vs_torch']:.2f} | {row['vs_own_dense']:.2f} | "
                          f"{row['GB_per_s']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
