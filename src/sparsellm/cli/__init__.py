"""The ``sparsellm`` command: a thin layer over the Python API, one module per verb."""

from __future__ import annotations

import argparse
import sys

from ..errors import SparseLLMError
from ..logging_utils import configure, logger
from . import (
    bench,
    bench_attention,
    compress,
    evaluate,
    generate,
    info,
    moefy,
    prune,
    report,
    sparsify_activations,
    train,
    upcycle,
)

COMMANDS = [prune, train, evaluate, info, compress, report, sparsify_activations, bench, generate, bench_attention,
            moefy, upcycle]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsellm", description="Make LLMs sparse, small and fast.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log (-v: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and results only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(-1 if args.quiet else args.verbose)
    try:
        import torch

        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.run(args) or 0
    except SparseLLMError as exc:
        print(f"sparsellm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
