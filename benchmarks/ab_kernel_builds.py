"""A/B of two builds of sparsellm's compiled kernels in one process (issue 4).

A kernel change is judged against the build before it on the same machine, at the same moment:
run-to-run noise on shared CPUs is larger than most kernel changes. Both compiled modules are
loaded side by side (their names differ by build key), every variant of bench_kernels.py gets one
ring of layouts that both builds read, and the calls are interleaved round by round, the builds
taking turns going first; the table gives medians and the speedup of the second build over the first.

    # the .so files are in <cache>/kernels/<build key>/, one per source state
    flock /tmp/sparsellm-heavy.lock python benchmarks/ab_kernel_builds.py OLD.so NEW.so --batch 16

``--attention`` compares the builds' decode attention instead: one query token against cached keys
and values of 128 / 1024 / 2048 tokens, for the heads of the sample model (9 over 3 key heads) and
of TinyLlama (32 over 4), per layer, on a ring of layers' caches as while decoding.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsellm.kernels import SparseLinear
from sparsellm.kernels.backend import DENSE_BLOCK_ROWS, ISA_CODES

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import RING_BYTES, pruned_weight, tensor_ring


def load_build(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).name.split(".")[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_turn(groups: list[list[str]], round_: int) -> list[str]:
    """The groups' names in order, each group reversed on odd rounds: the builds take turns going
    first. Of two back-to-back runs of one variant the second tends to read faster, whichever
    build it is: two A/Bs of the same two builds, their order swapped, favoured the second one
    0.95-1.20x and 1.01-1.44x (Zen 3, 2 threads)."""
    return [name for group in groups for name in (group if round_ % 2 == 0 else group[::-1])]


def measure(builds, isa: str, shape, batch: int, rounds: int, generator) -> None:
    x = torch.randn(batch, shape[1], generator=generator)
    sparse_x = x * (torch.rand(x.shape, generator=generator) >= 0.5)
    half = pruned_weight(shape, 0.5, "unstructured", generator)
    dense = torch.randn(shape, generator=generator)
    variants = {"sparsellm dense bf16": (dense, "dense", None), "bitmask 50%": (half, "bitmask", None),
                "bitmask 70%": (pruned_weight(shape, 0.7, "unstructured", generator), "bitmask", None),
                "2:4": (pruned_weight(shape, 0.5, "2:4", generator), "2:4", None),
                "activations 50%": (dense, "dense", 0.0), "bitmask 50% + act. 50%": (half, "bitmask", 0.0)}
    calls = {"torch fp32": [lambda w=w: F.linear(x, w) for w in tensor_ring(dense)]}
    calls["torch bf16"] = [lambda w=w: F.linear(x.to(torch.bfloat16), w) for w in tensor_ring(dense.to(torch.bfloat16))]
    for name, (weight, form, threshold) in variants.items():
        layer = SparseLinear.from_dense(weight.to(torch.bfloat16), format=form, dtype=None, threshold=threshold)
        count = max(2, -(-RING_BYTES // layer.layout.nbytes))
        ring = [replace(layer.layout, **{k: v.clone() for k, v in layer.layout.tensors.items()}) for _ in range(count)]
        given = (x if threshold is None else sparse_x).to(torch.bfloat16)
        cut = -1.0 if threshold is None else threshold
        for tag, build in builds.items():
            handles = [build.handle(item.out_features, item.in_features, *item.kernel_args()) for item in ring]
            calls[f"{name} {tag}"] = [lambda h=h, build=build, given=given, cut=cut: build.linear(
                given, h, ISA_CODES[isa], cut, True, None, DENSE_BLOCK_ROWS) for h in handles]
        first, second = (calls[f"{name} {tag}"][0]().float() for tag in builds)
        torch.testing.assert_close(first, second, rtol=2e-2, atol=2e-2 * first.abs().max().item())
    seconds = {name: [] for name in calls}
    with torch.no_grad():
        groups = [["torch fp32"], ["torch bf16"]] + [[f"{name} {tag}" for tag in builds] for name in variants]
        for round_ in range(rounds):
            for name in in_turn(groups, round_):
                ring = calls[name]
                started = time.perf_counter()
                for call in ring:
                    call()
                seconds[name].append((time.perf_counter() - started) / len(ring))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    baseline = min(median["torch fp32"], median["torch bf16"])
    old, new = builds
    print(f"\n{shape[0]}x{shape[1]}, batch {batch}, {isa}, medians of {rounds} interleaved rounds; torch fp32 "
          f"{median['torch fp32'] * 1e3:.3f} ms, bf16 {median['torch bf16'] * 1e3:.3f} ms")
    print(f"| variant | {old} ms | {new} ms | speedup | {old} vs torch | {new} vs torch |\n|---|---|---|---|---|---|")
    for name in variants:
        a, b = median[f"{name} {old}"], median[f"{name} {new}"]
        print(f"| {name} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f} | {baseline / a:.2f} | {baseline / b:.2f} |",
              flush=True)


ATTENTION_SHAPES = {"sample": (9, 3, 64, 30), "TinyLlama": (32, 4, 64, 22)}  # heads, key heads, dim, layers
ATTENTION_LENGTHS = (128, 1024, 2048)


def measure_attention(builds, rounds: int, generator) -> None:
    old, new = builds
    print(f"| model | keys | {old} us | {new} us | speedup |\n|---|---|---|---|---|")
    for model, (heads, kv_heads, dim, layers) in ATTENTION_SHAPES.items():
        for length in ATTENTION_LENGTHS:
            query = torch.randn(1, heads, 1, dim, generator=generator)
            caches = [[torch.randn(1, kv_heads, length, dim, generator=generator) for _ in range(2)]
                      for _ in range(layers)]
            first, second = (build.decode_attention(query, *caches[0], dim**-0.5) for build in builds.values())
            torch.testing.assert_close(first, second)
            seconds = {tag: [] for tag in builds}
            for round_ in range(rounds):
                for tag in in_turn([list(builds)], round_):
                    build = builds[tag]
                    started = time.perf_counter()
                    for key, value in caches:
                        build.decode_attention(query, key, value, dim**-0.5)
                    seconds[tag].append((time.perf_counter() - started) / layers)
            a, b = (statistics.median(seconds[tag]) for tag in builds)
            print(f"| {model} ({heads}/{kv_heads} heads) | {length} | {a * 1e6:.1f} | {b * 1e6:.1f} | {a / b:.2f} |",
                  flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the compiled module of the first build (.so)")
    parser.add_argument("new", help="the compiled module of the second build (.so)")
    parser.add_argument("--isa", default="avx2", choices=sorted(ISA_CODES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", action="append", help="OUTxIN (repeatable; default 4096x4096)")
    parser.add_argument("--attention", action="store_true", help="compare the decode attention instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builds = {"old": load_build(args.old), "new": load_build(args.new)}
    generator = torch.Generator().manual_seed(0)
    if args.attention:
        measure_attention(builds, args.rounds, generator)
        return 0
    for shape in [tuple(map(int, s.split("x"))) for s in args.shape or ["4096x4096"]]:
        measure(builds, args.isa, shape, args.batch, args.rounds, generator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
