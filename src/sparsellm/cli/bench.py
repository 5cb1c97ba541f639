"""sparsellm bench: decode and prefill speed of a pruned model, dense torch vs sparsellm's kernels."""

from __future__ import annotations

import argparse

from .. import speed
from ..kernels.cache import CACHES
from .common import emit


def add_parser(commands) -> None:
    parser = commands.add_parser("bench", help="decode / prefill tokens/s: dense torch vs sparsellm kernels",
                                 description="Interleaved runs of the same pruned weights: dense float32, "
                                             "dense bfloat16 (transformers) and sparsellm's kernels; medians "
                                             "and ratios to the faster dense variant.")
    parser.add_argument("folder", help="a pruned model folder")
    parser.add_argument("--kernels", default="auto", choices=["auto", "sparse"], help="dispatch of the kernel layers")
    parser.add_argument("--dtype", default="auto",
                        help="compute dtype of the kernel variant (auto: bfloat16 where the CPU multiplies "
                             "bfloat16, else float32; values stay bfloat16)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens to decode (batch 1, greedy)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--cache", default="dynamic", choices=CACHES,
                        help="KV cache of every variant while decoding: transformers' DynamicCache (one concatenation "
                             "a token), or sparsellm's, which grows in place")
    parser.add_argument("--layers", action="store_true", help="also time each projection alone at batch 1")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = speed.compare(args.folder, kernels=args.kernels, dtype=args.dtype,
                           decode_tokens=args.tokens, prefill_tokens=args.prefill, repeats=args.repeats, cache=args.cache)
    data = report.to_dict()
    lines = [f"{'variant':<16} {'decode tok/s':>12} {'ratio':>6} {'prefill tok/s':>13} {'ratio':>6}"]
    lines += [f"{r['variant']:<16} {r['decode_tokens_per_s']:>12.2f} {r['decode_ratio']:>6.2f} "
              f"{r['prefill_tokens_per_s']:>13.1f} {r['prefill_ratio']:>6.2f}" for r in report.rows()]
    lines.append(f"medians of {args.repeats} interleaved runs, {report.threads} threads, decode {args.tokens} tokens "
                 f"at batch 1 ({args.cache} KV cache), prefill {args.prefill} tokens; ratios to the faster dense variant")
    if args.layers:
        table = speed.layer_table(args.folder)
        data["layers"] = table
        lines.append(f"{'layer':<22} {'shape':>12} {'fp32 ms':>8} {'bf16 ms':>8} {'sparse ms':>9} {'ratio':>6}  format")
        lines += [f"{r['layer']:<22} {'x'.join(map(str, r['shape'])):>12} {r['float32_ms']:>8.3f} "
                  f"{r['bfloat16_ms']:>8.3f} {r['sparsellm_ms']:>9.3f} {r['ratio']:>6.2f}  {r['format']}" for r in table]
    emit(args, data, lines)
    return 0
