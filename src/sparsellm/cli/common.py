"""Arguments shared by several verbs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def add_model(parser: argparse.ArgumentParser, dtype_flag: str = "--dtype", recipe: bool = False) -> None:
    """``recipe``: the values may come from a recipe file, so flags have no defaults of their own."""
    parser.add_argument("--model", required=not recipe, default=argparse.SUPPRESS if recipe else None,
                        help="HF folder (dense or compact), .gguf file, hub id (online only), or 'sample' "
                             "(SmolLM2-135M-Instruct)")
    parser.add_argument(dtype_flag, dest="load_dtype", default=argparse.SUPPRESS if recipe else "float32",
                        help="dtype to load and compute in (default float32)")
    parser.add_argument("--offload-folder", help="keep weights on disk here and read one block at a time")
    parser.add_argument("--max-memory", help="with --offload-folder: CPU memory for weights, e.g. 2GB")


def add_eval(parser: argparse.ArgumentParser, prefix: str = "", recipe: bool = False) -> None:
    def default(value):
        return argparse.SUPPRESS if recipe else value

    parser.add_argument(f"--{prefix}data", default=default("builtin"),
                        help="evaluation text: builtin, a .txt file or folder, or a datasets name (online)")
    parser.add_argument(f"--{prefix}seqlen", type=int, default=default(512),
                        help="tokens per evaluation window (default 512)")
    parser.add_argument(f"--{prefix}windows", type=int, default=default(32), help="windows to score (0: all; default 32)")
    parser.add_argument(f"--{prefix}batch-size", type=int, default=default(4),
                        help="windows per forward pass (default 4)")


def eval_options(args: argparse.Namespace, prefix: str = "") -> dict:
    """The keyword arguments of ``evaluation.perplexity`` from the flags ``add_eval`` added."""
    prefix = prefix.replace("-", "_")
    return {"data": getattr(args, f"{prefix}data"), "seqlen": getattr(args, f"{prefix}seqlen"),
            "max_windows": getattr(args, f"{prefix}windows") or None,
            "batch_size": getattr(args, f"{prefix}batch_size")}


def add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda: where blocks are computed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def emit(args: argparse.Namespace, data: dict, lines: list[str]) -> None:
    """Results go to stdout: a JSON object with --json, else readable lines."""
    if args.json:
        json.dump(data, sys.stdout, indent=2,
                  default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))
        sys.stdout.write("\n")
    else:
        for line in lines:
            print(line)


def add_quantization(parser: argparse.ArgumentParser, recipe: bool = False) -> None:
    def default(value):
        return argparse.SUPPRESS if recipe else value

    parser.add_argument("--bits", type=int, default=default(None), choices=[2, 4, 8],
                        help="also quantize the kept weights to this many bits (weight-only integers)")
    parser.add_argument("--group-size", type=int, default=default(128),
                        help="with --bits: inputs sharing one scale (0: one scale per output channel; default 128)")
    symmetry = parser.add_mutually_exclusive_group()
    symmetry.add_argument("--sym", dest="symmetric", action="store_true", default=default(True),
                          help="with --bits: symmetric grid, no zero points (default)")
    symmetry.add_argument("--asym", dest="symmetric", action="store_false", default=default(True),
                          help="with --bits: asymmetric grid with a zero point per group")
    parser.add_argument("--quant-observer", choices=["minmax", "mse"], default=default("minmax"),
                        help="with --bits: fit each grid to the kept weights' range (minmax, default) or to the "
                             "clipped range with the least rounding error (mse)")


def quantization(args: argparse.Namespace):
    from ..weights.quant import QuantScheme

    return QuantScheme(args.bits, args.group_size, args.symmetric, args.quant_observer) if args.bits else None
