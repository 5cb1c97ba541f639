"""sparsellm prune: load, prune (and quantize) layer by layer, save a compact or dense folder with sparsity.json."""

from __future__ import annotations

import argparse

from .. import checkpoint, evaluation, models
from ..weights import METHODS, oneshot
from .common import add_eval, add_model, add_quantization, add_runtime, emit, quantization
from .sparsify_activations import add_arguments as add_activation_arguments
from .sparsify_activations import calibrate as calibrate_activations


def add_parser(commands) -> None:
    parser = commands.add_parser("prune", help="prune a model one-shot (magnitude, Wanda, SparseGPT)",
                                 description="Prune every linear layer of the decoder blocks, one block at a time.")
    add_model(parser, dtype_flag="--compute-dtype")
    parser.add_argument("--method", default="sparsegpt", choices=sorted(METHODS))
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of weights to prune per layer, in [0, 1) (implied by an N:M pattern)")
    parser.add_argument("--pattern", default="unstructured", help="unstructured or N:M (N kept of every M), e.g. 2:4")
    parser.add_argument("--calib", default="builtin",
                        help="calibration text: builtin, a .txt file or folder, or a datasets name (online)")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows (default 64)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --sampling random")
    parser.add_argument("--sampling", default="consecutive", choices=["consecutive", "random"],
                        help="calibration windows in order from the start, or drawn at random")
    parser.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                        help="leave layers whose name matches dense (repeatable)")
    parser.add_argument("--per-row", action="store_true", help="magnitude: one threshold per output row")
    parser.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    parser.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening, share of mean diag(H)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    add_quantization(parser)
    parser.add_argument("--output", required=True, help="folder for the pruned model")
    parser.add_argument("--format", default="compact", choices=checkpoint.FORMATS,
                        help="compact: packed sparse layers, size follows sparsity (default); dense: zeros stored, "
                             "loads with plain from_pretrained")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="dtype of the saved weights (default: as computed, --compute-dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--eval", action="store_true", help="measure perplexity before and after pruning")
    add_activation_arguments(parser, flag="--activation-sparsity")
    add_eval(parser, prefix="eval-")
    add_runtime(parser)
    parser.set_defaults(run=run)


def method_options(args: argparse.Namespace) -> dict:
    if args.method == "magnitude":
        return {"per_row": args.per_row}
    if args.method == "sparsegpt":
        return {"blocksize": args.blocksize, "percdamp": args.percdamp}
    return {}


def load(args: argparse.Namespace):
    max_memory = {"cpu": args.max_memory} if args.max_memory else None
    return models.load_model(args.model, dtype=args.load_dtype, offload_folder=args.offload_folder,
                             max_memory=max_memory)


def run(args: argparse.Namespace) -> int:
    checkpoint.check_output(args.output, args.overwrite)
    model, tokenizer = load(args)
    eval_kwargs = {"data": args.eval_data, "seqlen": args.eval_seqlen,
                   "max_windows": args.eval_windows or None, "batch_size": args.eval_batch_size}
    before = evaluation.perplexity(model, tokenizer, **eval_kwargs) if args.eval else None
    report = oneshot.prune(
        model, tokenizer, method=args.method, sparsity=args.sparsity, pattern=args.pattern, calib=args.calib,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, sampling=args.sampling, ignore=args.ignore,
        device=args.device, batch_size=args.batch_size, quantization=quantization(args), **method_options(args),
    )
    after = evaluation.perplexity(model, tokenizer, **eval_kwargs) if args.eval else None
    metadata = {"model": str(args.model)} | report.to_dict()
    if args.eval:
        metadata["evaluation"] = {"dense": before.to_dict(), "pruned": after.to_dict()}
    checkpoint.save(model, tokenizer, args.output, metadata, overwrite=args.overwrite, format=args.format,
                    dtype=args.dtype)
    scheme = quantization(args)
    lines = [f"pruned {len(report.layers)} layers with {report.method} {report.pattern}"
             + (f" + {scheme.describe()}" if scheme else "")
             + f": sparsity {report.achieved_sparsity:.4f} in {report.seconds:.1f} s -> {args.output} ({args.format})"]
    if args.eval:
        lines.append(f"perplexity: dense {before.perplexity:.3f} -> pruned {after.perplexity:.3f} "
                     f"({after.tokens} tokens of {after.data['name']}/{after.data['split']}, "
                     f"{'BOS first' if after.bos_prepended else 'no BOS'})")
    if args.activation_sparsity is not None:
        activations, activation_lines = calibrate_activations(args, model, tokenizer, args.calib, args.seqlen)
        activations.write(args.output)
        lines += activation_lines
        metadata["activation_sparsity"] = activations.to_dict()
        if args.eval:
            activations.attach(model)
            sparse = evaluation.perplexity(model, tokenizer, **eval_kwargs)
            activations.detach()
            metadata["activation_sparsity"]["perplexity"] = sparse.to_dict()
            lines.append(f"perplexity with {activations.sparsity:.0%} activation sparsity: {sparse.perplexity:.3f}")
    emit(args, metadata, lines)
    return 0
