"""Sparse attention benchmark (issue 6): kernels over sequence lengths, sample-model prefill and quality.

    bash benchmarks/peers/setup_local_attention.sh     # once: local-attention, the peer, into benchmarks/peers/site
    flock /tmp/sparsellm-heavy.lock python benchmarks/bench_attention.py

1. Kernels: 8 heads of 64, float32, batch 1, causal, 2 threads. PyTorch's fused causal SDPA (the
   baseline), SDPA with a banded boolean mask, sparsellm's window (w = 512), local-attention
   (lucidrains, window 512 with its exact-window mask, rotary off), BigBird (blocks of 64, 1 window
   block each side, 2 global, 3 random) and Performer (256 features). Times are the median of
   interleaved repeats; peak extra memory is one call in a fresh process (``sparsellm.attention.measure``).
2. Prefill of the sample model (SmolLM2-135M) on 8192 tokens, full attention vs window 512, end
   to end and the attention calls alone (timed inside the model), interleaved.
3. Perplexity of the sample model on the builtin evaluation text in 2048-token windows.

Writes benchmarks/results/attention.json and .md (the tables of docs/BENCHMARKS.md) and
docs/images/attention_scaling.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from sparsellm import attention, evaluation, load_model  # noqa: E402
from sparsellm.attention import measure  # noqa: E402
from sparsellm.data import load_text, token_windows  # noqa: E402

WINDOW = 512
PEER_SITE = HERE / "peers" / "site"
LOCAL_ATTENTION = f"python:{Path(__file__).resolve()}:local_attention_runner"
KERNELS = {"sdpa": "sdpa", f"banded:{WINDOW}": "banded mask", f"window:{WINDOW}": f"window {WINDOW}",
           LOCAL_ATTENTION: "local-attention", "bigbird": "bigbird", "performer": "performer"}
QUALITY = ["window:256", "window:512", "bigbird", "performer"]


def local_attention_runner(shape: measure.Shape):
    """The peer: local-attention's LocalAttention with the same window (exact: keys t - 512 .. t)."""
    sys.path.insert(0, str(PEER_SITE))
    from local_attention import LocalAttention

    module = LocalAttention(window_size=WINDOW, causal=shape.causal, look_backward=1, exact_windowsize=True,
                            use_rotary_pos_emb=False, autopad=True)
    return lambda q, k, v: module(q, k, v)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares slope, intercept and R^2."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    total = sum((y - mean_y) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, intercept, 1 - residual / total if total else 1.0


def peer_agreement(length: int = 2048) -> float:
    """Max |difference| between local-attention (exact window 512) and sparsellm's window 513 (the same keys)."""
    shape = measure.Shape(length)
    q, k, v = shape.inputs()
    with torch.inference_mode():
        theirs = local_attention_runner(shape)(q, k, v)
        ours = attention.window_attention(q, k, v, WINDOW + 1)
    return (theirs - ours).abs().max().item()


def kernels(lengths: list[int], repeats: int, banded_max: int) -> dict:
    rows = []
    for n in lengths:  # the banded mask needs n x n booleans (and a float copy): only up to banded_max
        specs = [spec for spec in KERNELS if n <= banded_max or not spec.startswith("banded")]
        rows += measure.time_sweep(specs, [measure.Shape(n)], repeats)
    for row in rows:
        row["peak_extra_mib"] = measure.peak_memory(row["spec"], measure.Shape(row["length"]), 2)["peak_extra_mib"]
    return {"rows": rows, "peer_max_abs_difference": peer_agreement()}


@contextlib.contextmanager
def timed_attention(model):
    """Seconds spent in the model's attention function (whatever implementation it uses now)."""
    from transformers import AttentionInterface

    name = model.config._attn_implementation
    original = AttentionInterface._global_mapping[name]
    spent = [0.0]

    def timed(*args, **kwargs):
        started = time.perf_counter()
        out = original(*args, **kwargs)
        spent[0] += time.perf_counter() - started
        return out

    AttentionInterface._global_mapping[name] = timed
    try:
        yield spent
    finally:
        AttentionInterface._global_mapping[name] = original


def prefill(tokens: int, repeats: int) -> dict:
    model, tokenizer = load_model("sample")
    ids = token_windows(tokenizer, load_text("builtin", "calibration"), tokens)[:1]
    runs: dict[str, dict[str, list[float]]] = {}
    for repeat in range(repeats + 1):  # the first round warms up
        for spec in ("sdpa", f"window:{WINDOW}"):
            attention.apply(model, spec)
            with torch.inference_mode(), timed_attention(model) as spent:
                started = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
                total = time.perf_counter() - started
            if repeat:
                run = runs.setdefault(spec, {"total": [], "attention": []})
                run["total"].append(total)
                run["attention"].append(spent[0])
    return {"tokens": tokens, **{spec: {key: statistics.median(values) for key, values in run.items()} | {
        "all": run} for spec, run in runs.items()}}


def quality(seqlen: int, windows: int) -> dict:
    model, tokenizer = load_model("sample")
    options = {"data": "builtin", "seqlen": seqlen, "max_windows": windows, "batch_size": 1}
    results = {"full": evaluation.perplexity(model, tokenizer, **options).to_dict()}
    for spec in QUALITY:
        attention.apply(model, spec)
        results[spec] = evaluation.perplexity(model, tokenizer, **options).to_dict()
        attention.apply(model, "sdpa")
    return results


def markdown(results: dict) -> str:
    lines = []
    if "kernels" in results:
        rows = results["kernels"]["rows"]
        lengths = sorted({r["length"] for r in rows})
        cell = {(r["spec"], r["length"]): r for r in rows}
        names = [spec for spec in KERNELS if any((spec, n) in cell for n in lengths)]
        lines += ["| length | " + " | ".join(f"{KERNELS[s]} ms" for s in names) + " | window vs sdpa | "
                  "window vs local-attention | banded vs sdpa |", "|" + "---|" * (len(names) + 4)]
        for n in lengths:
            sdpa, win = cell[("sdpa", n)], cell[(f"window:{WINDOW}", n)]
            peer = cell.get((LOCAL_ATTENTION, n))
            band = cell.get((f"banded:{WINDOW}", n))
            lines.append(f"| {n} | " + " | ".join(f"{cell[(s, n)]['seconds'] * 1e3:.0f}" if (s, n) in cell else "-"
                                                  for s in names)
                         + f" | {sdpa['seconds'] / win['seconds']:.2f}x"
                         + (f" | {peer['seconds'] / win['seconds']:.2f}x" if peer else " | -")
                         + (f" | {sdpa['seconds'] / band['seconds']:.2f}x |"
                            if band else " | - |"))
        lines += ["", "| length | " + " | ".join(f"{KERNELS[s]} MiB" for s in names)
                  + " | window / local-attention |", "|" + "---|" * (len(names) + 2)]
        for n in lengths:
            win, peer = cell[(f"window:{WINDOW}", n)], cell.get((LOCAL_ATTENTION, n))
            lines.append(f"| {n} | " + " | ".join(f"{cell[(s, n)]['peak_extra_mib']:.0f}" if (s, n) in cell else "-"
                                                  for s in names)
                         + (f" | {win['peak_extra_mib'] / peer['peak_extra_mib']:.2f} |" if peer else " | - |"))
        lines.append("")
        for spec in (f"window:{WINDOW}", "bigbird", "performer", "sdpa"):
            points = [(n, cell[(spec, n)]) for n in lengths if (spec, n) in cell]
            xs = [n / 1024 for n, _ in points]
            t_slope, t_icpt, t_r2 = fit_line(xs, [r["seconds"] * 1e3 for _, r in points])
            m_slope, m_icpt, m_r2 = fit_line(xs, [r["peak_extra_mib"] for _, r in points])
            lines.append(f"- {KERNELS[spec]}: time {t_slope:.1f} ms per 1k tokens (+{t_icpt:.0f} ms, R^2 {t_r2:.3f}); "
                         f"peak memory {m_slope:.1f} MiB per 1k tokens (+{m_icpt:.0f} MiB, R^2 {m_r2:.3f})")
        lines.append(f"- local-attention (exact window 512) vs sparsellm window 513, same keys: max |diff| "
                     f"{results['kernels']['peer_max_abs_difference']:.1e}")
    if "prefill" in results:
        p = results["prefill"]
        full, win = p["sdpa"], p[f"window:{WINDOW}"]
        lines += ["", f"| sample-model prefill, {p['tokens']} tokens | full (sdpa) s | window {WINDOW} s | speedup |",
                  "|---|---|---|---|",
                  f"| end to end | {full['total']:.2f} | {win['total']:.2f} | {full['total'] / win['total']:.2f}x |",
                  f"| attention calls alone | {full['attention']:.2f} | {win['attention']:.2f} | "
                  f"{full['attention'] / win['attention']:.2f}x |"]
    if "quality" in results:
        q = results["quality"]
        full = q["full"]
        lines += ["", "| attention | perplexity | vs full | seconds | speed vs full |", "|---|---|---|---|---|"]
        for spec, r in q.items():
            lines.append(f"| {spec} | {r['perplexity']:.3f} | x{r['perplexity'] / full['perplexity']:.3f} | "
                         f"{r['seconds']:.1f} | {full['seconds'] / r['seconds']:.2f}x |")
        lines.append(f"\n({full['tokens']} predicted tokens: {full['windows']} windows of {full['seqlen']}, "
                     f"{full['data']['name']}/{full['data']['split']}, sha256 {full['data']['sha256_16']})")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["kernels"]["rows"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for spec, label in KERNELS.items():
        points = sorted((r["length"], r["seconds"], r["peak_extra_mib"]) for r in rows if r["spec"] == spec)
        if points:
            lengths, seconds, memory = zip(*points, strict=True)
            axes[0].plot(lengths, seconds, marker="o", label=label)
            axes[1].plot(lengths, memory, marker="o", label=label)
    for axis, label in zip(axes, ("time per call (s)", "peak extra memory (MiB)"), strict=True):
        axis.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("8 heads x 64, fp32, batch 1, causal, 2 threads")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="kernels,prefill,quality")
    parser.add_argument("--lengths", default="2048,8192,16384,32768")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--banded-max", type=int, default=16384, help="longest length for the banded-mask baseline")
    parser.add_argument("--prefill-tokens", type=int, default=8192)
    parser.add_argument("--quality-seqlen", type=int, default=2048)
    parser.add_argument("--quality-windows", type=int, default=8)
    parser.add_argument("--output", default=str(HERE / "results" / "attention"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not PEER_SITE.exists():
        sys.exit("run benchmarks/peers/setup_local_attention.sh first (installs local-attention into benchmarks/peers/site)")
    parts = args.parts.split(",")
    results: dict = {"torch": torch.__version__, "threads": 2}
    if "kernels" in parts:
        results["kernels"] = kernels([int(n) for n in args.lengths.split(",")], args.repeats, args.banded_max)
        plot(results, HERE.parent / "docs" / "images" / "attention_scaling.png")
    if "prefill" in parts:
        results["prefill"] = prefill(args.prefill_tokens, args.repeats)
    if "quality" in parts:
        results["quality"] = quality(args.quality_seqlen, args.quality_windows)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    output.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
