"""sparsellm info: per-layer sparsity table of a model folder."""

from __future__ import annotations

import argparse

from .. import info
from .common import emit


def add_parser(commands) -> None:
    parser = commands.add_parser("info", help="per-layer sparsity of a model folder")
    parser.add_argument("folder", help="an HF model folder")
    parser.add_argument("--all", action="store_true", help="list dense tensors too")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = info.summary(args.folder)
    rows = [r for r in result["tensors"] if args.all or r.sparsity > 0]
    width = max((len(r.name) for r in rows), default=10)
    lines = [f"{'tensor':<{width}}  {'shape':>13}  {'dtype':>8}  {'sparsity':>8}  {'MB':>8}"]
    lines += [f"{r.name:<{width}}  {'x'.join(map(str, r.shape)):>13}  {r.dtype:>8}  {r.sparsity:>8.4f}  "
              f"{r.bytes / 1e6:>8.2f}" for r in rows]
    lines.append(f"{result['pruned_layers']} pruned layers, sparsity {result['pruned_layer_sparsity']:.4f}"
                 + (f" ({result['method']} {result['pattern']})" if result["method"] else ""))
    emit(args, result, lines)
    return 0
