"""sparsellm report: an HTML page (and PNGs) showing what pruning runs chose and why, compared side by side."""

from __future__ import annotations

import argparse


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "report", help="HTML report of one or several pruned folders (sparsity per layer, allocation, "
                       "errors, perplexity vs sparsity, size)")
    parser.add_argument("folders", nargs="+", metavar="DIR", help="folders written by sparsellm prune")
    parser.add_argument("--output", help="report folder (default DIR/report for one DIR; required for several)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..report import write_report  # matplotlib only when a report is asked for

    page = write_report(args.folders, args.output)
    print(page)
    return 0
