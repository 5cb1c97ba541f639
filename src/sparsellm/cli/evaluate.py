"""sparsellm eval: perplexity of a model on held-out text, optionally with sparse attention against full."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import evaluation
from ..activations import ActivationSparsity
from ..logging_utils import logger
from .common import add_eval, add_model, add_runtime, emit, eval_options
from .prune import load


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="perplexity on held-out text (tokens, ppl, seconds)")
    add_model(parser)
    add_eval(parser)
    parser.add_argument("--attention", metavar="SPEC",
                        help="also score with sparse attention and compare with full attention on the same text: "
                             "window:256, bigbird:block=64,global=2,random=3, performer:features=256")
    add_runtime(parser)
    parser.set_defaults(run=run)


def describe(result: evaluation.Perplexity) -> str:
    return (f"perplexity {result.perplexity:.3f}  tokens {result.tokens}  windows {result.windows}x{result.seqlen}  "
            f"seconds {result.seconds:.1f}")


def run(args: argparse.Namespace) -> int:
    if args.attention:
        from ..attention import compare, parse_spec

        method = parse_spec(args.attention)  # a bad spec fails before the model loads
    model, tokenizer = load(args)
    activations = ActivationSparsity.read(args.model) if Path(args.model).is_dir() else None
    if activations is not None:  # evaluate the model as it runs
        activations.attach(model)
        logger.info("applying the folder's activation sparsity (%.0f %% of each layer's inputs zeroed)",
                    100 * activations.sparsity)
    options = eval_options(args)
    if args.attention:
        compared = compare(model, tokenizer, method, **options)
        full, sparse = compared["full"], compared["sparse"]
        emit(args, {"attention": compared["attention"], "full": full.to_dict(), "sparse": sparse.to_dict(),
                    "speedup": full.seconds / sparse.seconds}, [
            f"full attention     {describe(full)}",
            f"{compared['attention']:<18} {describe(sparse)}",
            f"perplexity x{sparse.perplexity / full.perplexity:.3f}, speed x{full.seconds / sparse.seconds:.2f} "
            f"vs full attention (data {full.data['name']}/{full.data['split']}, sha256 {full.data['sha256_16']})",
        ])
        return 0
    result = evaluation.perplexity(model, tokenizer, **options)
    emit(args, result.to_dict(), [
        f"{describe(result)}  data {result.data['name']}/{result.data['split']} "
        f"(sha256 {result.data['sha256_16']}, {'BOS first' if result.bos_prepended else 'no BOS'})"
    ])
    return 0
