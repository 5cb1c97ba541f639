"""sparsellm eval: perplexity of a model on held-out text."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import evaluation
from ..activations import ActivationSparsity
from ..logging_utils import logger
from .common import add_eval, add_model, add_runtime, emit
from .prune import load


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="perplexity on held-out text (tokens, ppl, seconds)")
    add_model(parser)
    add_eval(parser)
    add_runtime(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    activations = ActivationSparsity.read(args.model) if Path(args.model).is_dir() else None
    if activations is not None:  # evaluate the model as it runs
        activations.attach(model)
        logger.info("applying the folder's activation sparsity (%.0f %% of each layer's inputs zeroed)",
                    100 * activations.sparsity)
    result = evaluation.perplexity(model, tokenizer, data=args.data, seqlen=args.seqlen,
                                 max_windows=args.windows or None, batch_size=args.batch_size)
    emit(args, result.to_dict(), [
        f"perplexity {result.perplexity:.3f}  tokens {result.tokens}  windows {result.windows}x{result.seqlen}  "
        f"seconds {result.seconds:.1f}  data {result.data['name']}/{result.data['split']} "
        f"(sha256 {result.data['sha256_16']}, {'BOS first' if result.bos_prepended else 'no BOS'})"
    ])
    return 0
