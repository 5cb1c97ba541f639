"""sparsellm sparsify-activations: calibrate TEAL thresholds for a model folder and save them in it."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from .. import models
from ..activations import teal
from ..errors import SparseLLMError
from .common import emit


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "sparsify-activations", help="activation sparsity (TEAL): calibrate per-layer input thresholds",
        description="Calibrate a threshold per linear layer so that a share --sparsity of its inputs is "
                    "zeroed at run time; writes activation_sparsity.json into the folder, which "
                    "sparsellm generate / bench / eval then apply.")
    parser.add_argument("folder", help="a model folder")
    add_arguments(parser, flag="--sparsity", required=True)
    parser.add_argument("--calib", default="builtin", help="calibration text: builtin, a .txt file or folder, ...")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser, flag: str, required: bool = False, recipe: bool = False) -> None:
    """The activation-sparsity options (shared with ``prune --activation-sparsity``, where ``recipe``
    leaves them without defaults so a recipe file's values stand)."""
    def default(value):
        return argparse.SUPPRESS if recipe else value

    parser.add_argument(flag, dest="activation_sparsity", type=float, required=required, default=default(None),
                        help="share of each layer's inputs zeroed at run time, in [0, 1)")
    parser.add_argument("--activation-nsamples", type=int, default=default(32),
                        help="calibration windows for the thresholds (default 32)")
    parser.add_argument("--held-out-windows", type=int, default=default(8),
                        help="evaluation windows on which the reached sparsity is measured (0: skip)")


def summary(result: dict) -> list[str]:
    """Report lines for an ``ActivationSparsity.to_dict()``."""
    lines = [f"activation thresholds for {len(result['thresholds'])} layers, target sparsity {result['sparsity']:.2f}"]
    if result.get("held_out"):
        values = list(result["held_out"].values())
        lines.append(f"held-out sparsity: mean {statistics.mean(values):.4f}, min {min(values):.4f}, "
                     f"max {max(values):.4f} over {len(values)} layers")
    if "perplexity" in result:
        lines.append(f"perplexity with {result['sparsity']:.0%} activation sparsity: "
                     f"{result['perplexity']['perplexity']:.3f}")
    return lines


def run(args: argparse.Namespace) -> int:
    if not Path(args.folder).is_dir():
        raise SparseLLMError(f"{args.folder} is not a model folder (the thresholds are saved into it)")
    model, tokenizer = models.load_model(args.folder)
    result = teal.calibrate(model, tokenizer, args.activation_sparsity, calib=args.calib,
                            nsamples=args.activation_nsamples, seqlen=args.seqlen)
    if args.held_out_windows:
        teal.held_out_sparsity(model, tokenizer, result, seqlen=args.seqlen, windows=args.held_out_windows)
    path = result.write(args.folder)
    emit(args, result.to_dict(), [*summary(result.to_dict()), f"-> {path}"])
    return 0
