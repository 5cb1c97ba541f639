"""sparsellm info: per-layer sparsity table of a model folder."""

from __future__ import annotations

import argparse

from .. import info
from .common import emit


def add_parser(commands) -> None:
    parser = commands.add_parser("info", help="per-layer sparsity (and format, bits, bytes) of a model folder")
    parser.add_argument("folder", help="an HF model folder, dense or compact")
    parser.add_argument("--all", action="store_true", help="list dense tensors too")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = info.summary(args.folder)
    rows = [r for r in result["tensors"] if args.all or r.sparsity > 0 or r.layout != "dense" or (r.bits or 16) < 16]
    width = max((len(r.name) for r in rows), default=10)
    if result["format"] == "compact":
        lines = [f"{'tensor':<{width}}  {'shape':>11}  {'format':<22}  {'bits':>4}  {'sparsity':>8}  {'MB':>7}  "
                 f"{'dense MB':>8}  {'of dense':>8}"]
        lines += [f"{r.name:<{width}}  {'x'.join(map(str, r.shape)):>11}  {r.layout:<22}  {r.bits:>4}  "
                  f"{r.sparsity:>8.4f}  {r.bytes / 1e6:>7.3f}  {r.dense_bytes / 1e6:>8.3f}  "
                  f"{100 * r.bytes / max(r.dense_bytes, 1):>7.1f}%" for r in rows]
        lines.append(f"linear layers: {result['bytes'] / 1e6:.2f} MB on disk, {result['dense_bytes'] / 1e6:.2f} MB "
                     f"dense ({100 * result['bytes'] / max(result['dense_bytes'], 1):.1f} %)")
    else:
        lines = [f"{'tensor':<{width}}  {'shape':>13}  {'dtype':>8}  {'sparsity':>8}  {'MB':>8}"]
        lines += [f"{r.name:<{width}}  {'x'.join(map(str, r.shape)):>13}  {r.dtype:>8}  {r.sparsity:>8.4f}  "
                  f"{r.bytes / 1e6:>8.2f}" for r in rows]
    lines.append(f"{result['pruned_layers']} pruned layers, sparsity {result['pruned_layer_sparsity']:.4f}"
                 + (f" ({result['method']} {result['pattern']})" if result["method"] else ""))
    emit(args, result, lines)
    return 0
