"""sparsellm bench-attention: time and peak memory of attention implementations over sequence lengths."""

from __future__ import annotations

import argparse

from ..attention import measure
from ..errors import SparseLLMError
from .common import emit

DEFAULT = ("sdpa", "window:512", "bigbird", "performer")


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "bench-attention", help="time and peak memory of sparse attention vs full attention over sequence lengths",
        description="Random inputs; times interleaved (median of --repeats), peak memory in a fresh process each.")
    parser.add_argument("--attention", action="append", metavar="SPEC",
                        help="an implementation to measure, repeatable; the first is the baseline of the ratios: "
                             "sdpa, banded:W, window:W, bigbird:block=64,global=2,random=3, performer:features=256, "
                             f"python:FILE:FUNCTION (default: {' '.join(DEFAULT)})")
    parser.add_argument("--lengths", default="2048,4096,8192", help="comma-separated sequence lengths")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bidirectional", action="store_true", help="no causal mask")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per implementation and length")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--plot", help="write time and memory against length to this image (PNG)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.set_defaults(run=run)


def parse_list(text: str, what: str, convert=str) -> list:
    try:
        items = [convert(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SparseLLMError(f"--{what} must be a comma-separated list, got '{text}'") from None
    if not items:
        raise SparseLLMError(f"--{what} is empty")
    return items


def run(args: argparse.Namespace) -> int:
    specs = args.attention or list(DEFAULT)
    lengths = parse_list(args.lengths, "lengths", int)
    if min(lengths) < 1 or args.repeats < 1:
        raise SparseLLMError("--lengths and --repeats must be positive")
    shapes = [measure.Shape(length, args.heads, args.kv_heads or args.heads, args.head_dim, args.batch,
                            not args.bidirectional) for length in lengths]
    for spec in specs:  # fail on a bad spec before minutes of timing
        measure.runner(spec, measure.Shape(1))
    results = measure.time_sweep(specs, shapes, args.repeats)
    if not args.no_memory:
        for result, shape in zip(results, [s for s in shapes for _ in specs], strict=True):
            result["peak_extra_mib"] = measure.peak_memory(result["spec"], shape, args.threads)["peak_extra_mib"]
    baseline = {r["length"]: r["seconds"] for r in results if r["spec"] == specs[0]}
    lines = [f"{'length':>7} {'attention':<34} {'ms':>10} {'vs ' + specs[0]:>10} {'peak MiB':>9}"]
    for result in results:
        memory = f"{result['peak_extra_mib']:9.0f}" if "peak_extra_mib" in result else f"{'-':>9}"
        lines.append(f"{result['length']:>7} {result['spec']:<34} {result['seconds'] * 1e3:>10.1f} "
                     f"{baseline[result['length']] / result['seconds']:>9.2f}x {memory}")
    if args.plot:
        plot(results, specs, args.plot)
        lines.append(f"plot: {args.plot}")
    emit(args, {"results": results, "baseline": specs[0]}, lines)
    return 0


def plot(results: list[dict], specs: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("seconds", "time per call (s)")]
    if "peak_extra_mib" in results[0]:
        panels.append(("peak_extra_mib", "peak extra memory (MiB)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (field, label) in zip(axes[0], panels, strict=True):
        for spec in specs:
            points = [(r["length"], r[field]) for r in results if r["spec"] == spec]
            axis.plot(*zip(*points, strict=True), marker="o", label=spec)
        axis.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
