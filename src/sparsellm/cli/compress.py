"""sparsellm compress: rewrite a model folder (dense with zeros) as a compact folder."""

from __future__ import annotations

import argparse

from .. import info
from ..format import compact
from .common import add_quantization, emit, quantization


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "compress", help="store a pruned model folder compactly (size follows sparsity)",
        description="Pack the zeros out of a model folder's decoder-block linear layers; optionally quantize "
                    "them (round-to-nearest; for calibrated GPTQ use prune --bits).")
    parser.add_argument("folder", help="an HF model folder, e.g. pruned with --format dense")
    parser.add_argument("--output", required=True, help="folder for the compact model")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="dtype of the saved weights (default: as in the folder)")
    add_quantization(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..models import parse_dtype

    dtype = parse_dtype(args.dtype) if args.dtype else None
    compact.compress(args.folder, args.output, dtype, quantization(args), args.overwrite)
    result = info.summary(args.output)
    emit(args, result, [f"{args.folder} -> {args.output}: linear layers {result['bytes'] / 1e6:.2f} MB "
                        f"({100 * result['bytes'] / max(result['dense_bytes'], 1):.1f} % of dense), "
                        f"sparsity {result['pruned_layer_sparsity']:.4f}"])
    return 0
