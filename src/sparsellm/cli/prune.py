"""sparsellm prune: load, prune (and quantize) layer by layer, save a compact or dense folder with
sparsity.json and recipe.yaml.

Every option of the job lives in a ``Recipe``; flags given on the command line override the
values of ``--recipe FILE`` (or the recipe defaults), so flags and recipes run the same code.
"""

from __future__ import annotations

import argparse

from .. import checkpoint, models
from ..errors import SparseLLMError
from ..recipe import Recipe, recipe_scheme
from ..weights import METHODS
from ..weights.allocation import ALLOCATIONS
from ..weights.allocation.table import read_table
from .common import add_eval, add_model, add_quantization, add_runtime, emit
from .sparsify_activations import add_arguments as add_activation_arguments
from .sparsify_activations import summary as activation_summary

# flag (argparse dest) -> where its value goes in the recipe
RECIPE_FLAGS = {
    "model": "model", "load_dtype": "compute_dtype", "method": "method", "sparsity": "sparsity",
    "pattern": "pattern", "allocation": "allocation", "ignore": "ignore", "format": "format", "dtype": "save_dtype",
    "calib": "calibration.data", "nsamples": "calibration.nsamples", "seqlen": "calibration.seqlen",
    "seed": "calibration.seed", "sampling": "calibration.sampling", "batch_size": "calibration.batch_size",
    "eval": "evaluation.enabled", "eval_data": "evaluation.data", "eval_seqlen": "evaluation.seqlen",
    "eval_windows": "evaluation.windows", "eval_batch_size": "evaluation.batch_size",
    "max_ppl_increase": "target.max_ppl_increase", "target_size": "target.max_size",
    "search_step": "target.search_step",
    "bits": "quantization.bits", "group_size": "quantization.group_size", "symmetric": "quantization.symmetric",
    "quant_observer": "quantization.observer",
    "per_row": "method_options.per_row", "blocksize": "method_options.blocksize",
    "percdamp": "method_options.percdamp", "calibration_inputs": "method_options.calibration_inputs",
    "owl_m": "allocation_options.m", "owl_lambda": "allocation_options.lam", "owl_tune": "allocation_options.tune",
    "sensitivity_levels": "allocation_options.levels", "sensitivity_windows": "allocation_options.windows",
    "sensitivity_granularity": "allocation_options.granularity", "sensitivity_loss": "allocation_options.loss",
    "table": "allocation_options.rules",
    "activation_sparsity": "activations.sparsity", "activation_nsamples": "activations.nsamples",
    "held_out_windows": "activations.held_out_windows",
}


def _levels(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated numbers, got {text!r}") from exc


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "prune", help="prune (and quantize) a model one-shot: magnitude, Wanda, SparseGPT; uniform, OWL, "
                      "sensitivity or table allocation; or a perplexity target",
        description="Prune every linear layer of the decoder blocks, one block at a time. Flags override the "
                    "values of --recipe; the output folder keeps the resolved recipe as recipe.yaml.")
    keep = argparse.SUPPRESS  # only flags actually given reach the recipe
    parser.add_argument("--recipe", help="a YAML recipe holding the whole job (see recipe.yaml in any output)")
    add_model(parser, dtype_flag="--compute-dtype", recipe=True)
    parser.add_argument("--method", default=keep, choices=sorted(METHODS), help="default sparsegpt")
    parser.add_argument("--sparsity", type=float, default=keep,
                        help="target fraction of weights to prune, in [0, 1) (implied by an N:M pattern)")
    parser.add_argument("--pattern", default=keep, help="unstructured (default) or N:M (N kept of every M), e.g. 2:4")
    parser.add_argument("--allocation", default=keep, choices=sorted(ALLOCATIONS),
                        help="how the target is shared among layers (default uniform); with N:M, N varies per block")
    parser.add_argument("--owl-m", type=float, default=keep, help="OWL outlier threshold M (default 5)")
    parser.add_argument("--owl-lambda", type=float, default=keep,
                        help="OWL largest shift of a block's sparsity from the target (default 0.08)")
    parser.add_argument("--owl-tune", action="store_true", default=keep,
                        help="choose OWL's M and lambda for this model: Wanda candidates scored on 16 held-out "
                             "calibration windows (one dense pass; the chosen pair is saved in the recipe)")
    parser.add_argument("--sensitivity-levels", type=_levels, default=keep,
                        help="sensitivity: comma-separated sparsities to probe (default target-0.1,target,target+0.1)")
    parser.add_argument("--sensitivity-windows", type=int, default=keep,
                        help="sensitivity: calibration windows the loss is measured on (default 4)")
    parser.add_argument("--sensitivity-granularity", choices=["block", "layer"], default=keep,
                        help="sensitivity: probe whole blocks (default) or single layers")
    parser.add_argument("--sensitivity-loss", choices=["kl", "nll"], default=keep,
                        help="sensitivity: KL to the dense model's predictions (default) or the NLL increase")
    parser.add_argument("--table", default=keep, metavar="FILE",
                        help="YAML table of layer regex -> sparsity (implies --allocation table)")
    parser.add_argument("--max-ppl-increase", default=keep, metavar="SHARE",
                        help="instead of --sparsity: the sparsest model whose perplexity rises at most this, e.g. 5%%")
    parser.add_argument("--target-size", default=keep, metavar="SIZE",
                        help="instead of --sparsity: the least sparse model whose compact folder fits in SIZE, "
                             "e.g. 60MB (KB/MB/GB: powers of 1000; KiB/MiB/GiB: of 1024)")
    parser.add_argument("--search-step", type=float, default=keep,
                        help="grid of the sparsity searches (default 0.01)")
    parser.add_argument("--calib", default=keep,
                        help="calibration text: builtin, a .txt file or folder, or a datasets name (online)")
    parser.add_argument("--nsamples", type=int, default=keep, help="calibration windows (default 64)")
    parser.add_argument("--seqlen", type=int, default=keep, help="tokens per calibration window (default 512)")
    parser.add_argument("--seed", type=int, default=keep, help="seed for --sampling random")
    parser.add_argument("--sampling", default=keep, choices=["consecutive", "random"],
                        help="calibration windows in order from the start, or drawn at random")
    parser.add_argument("--ignore", action="append", default=keep, metavar="REGEX",
                        help="leave layers whose name matches dense (repeatable)")
    parser.add_argument("--per-row", action="store_true", default=keep, help="magnitude: one threshold per output row")
    parser.add_argument("--blocksize", type=int, default=keep, help="SparseGPT column block size (default 128)")
    parser.add_argument("--percdamp", type=float, default=keep,
                        help="SparseGPT dampening, share of mean diag(H) (default 0.01)")
    parser.add_argument("--calibration-inputs", choices=["dense", "pruned"], default=keep,
                        help="calibrate each block on the dense model's activations or on the pruned model's "
                             "(errors propagate); default: dense for Wanda, pruned for SparseGPT")
    parser.add_argument("--batch-size", type=int, default=keep, help="calibration windows per forward pass (default 8)")
    add_quantization(parser, recipe=True)
    parser.add_argument("--output", required=True, help="folder for the pruned model")
    parser.add_argument("--format", default=keep, choices=checkpoint.FORMATS,
                        help="compact: packed sparse layers, size follows sparsity (default); dense: zeros stored, "
                             "loads with plain from_pretrained")
    parser.add_argument("--dtype", default=keep, choices=["bfloat16", "float16", "float32"],
                        help="dtype of the saved weights (default: as computed, --compute-dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--eval", action="store_true", default=keep, help="measure perplexity before and after pruning")
    add_activation_arguments(parser, flag="--activation-sparsity", recipe=True)
    add_eval(parser, prefix="eval-", recipe=True)
    add_runtime(parser)
    parser.set_defaults(run=run)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe file (if any) with every flag given on the command line written over it."""
    given = {dest: value for dest, value in vars(args).items() if dest in RECIPE_FLAGS}
    if args.recipe:
        data = Recipe.load(args.recipe).to_dict()
    elif "model" in given:
        data = {"model": given["model"]}
    else:
        raise SparseLLMError("give --model (or a --recipe)")
    if "table" in given:
        given["table"] = read_table(given["table"])
        given.setdefault("allocation", "table")
    # options of another method or allocation than the recipe's do not carry over
    if given.get("method", data.get("method")) != data.get("method"):
        data["method_options"] = {}
    if given.get("allocation", data.get("allocation")) != data.get("allocation"):
        data["allocation_options"] = {}
    for dest, value in given.items():
        section, _, key = RECIPE_FLAGS[dest].partition(".")
        if key:
            data[section] = dict(data.get(section) or {}) | {key: value}
        else:
            data[section] = value
    return Recipe.from_dict(data)


def _max_memory(args: argparse.Namespace) -> dict | None:
    return {"cpu": args.max_memory} if args.max_memory else None


def load(args: argparse.Namespace):
    return models.load_model(args.model, dtype=args.load_dtype, offload_folder=args.offload_folder,
                             max_memory=_max_memory(args))


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    metadata = recipe.run(args.output, overwrite=args.overwrite, device=args.device,
                          offload_folder=args.offload_folder, max_memory=_max_memory(args))
    lines = [f"candidate: sparsity {c['sparsity']:.3f}  planned {c['planned_bytes'] / 1e6:.2f} MB"
             + (f"  on disk {c['bytes'] / 1e6:.2f} MB  {'fits' if c['accepted'] else 'too large'}"
                if c["bytes"] is not None else "")
             for c in metadata.get("size_search", {}).get("candidates", [])]
    if "size_search" in metadata:
        lines.append(f"{args.output}: {checkpoint.folder_bytes(args.output) / 1e6:.2f} MB on disk "
                     f"(target {metadata['size_search']['max_bytes'] / 1e6:.2f} MB)")
    for candidate in metadata.get("search", {}).get("candidates", []):
        lines.append(f"candidate {candidate['stage']:>6}: sparsity {candidate['sparsity']:.3f}  perplexity "
                     f"{candidate['perplexity']:.3f} ({100 * candidate['increase']:+.2f} %)  "
                     f"{'ok' if candidate['accepted'] else 'over the limit'}")
    if "owl_tuning" in metadata:
        grid, best = metadata["owl_tuning"]["grid"], metadata["owl_tuning"]["best"]
        lines.append(f"OWL tuned on {metadata['owl_tuning']['held_out_windows']} held-out calibration windows: "
                     f"M {best['m']:g}, lambda {best['lam']:g} (perplexity {best['perplexity']:.3f}; uniform "
                     f"{grid[0]['perplexity']:.3f}; {len(grid) - 1} candidates)")
    if "layers" in metadata:
        scheme = recipe_scheme(recipe)
        lines.append(f"pruned {len(metadata['layers'])} layers with {metadata['method']} {metadata['pattern']} "
                     f"({metadata['allocation']['name']} allocation)"
                     + (f" + {scheme.describe()}" if scheme else "")
                     + f": sparsity {metadata['achieved_sparsity']:.4f} in {metadata['seconds']:.1f} s "
                     f"-> {args.output} ({recipe.format})")
    else:
        lines.append(f"no sparsity meets the target; the dense model was saved -> {args.output}")
    if "evaluation" in metadata:
        after = metadata["evaluation"]["pruned"]
        lines.append(f"perplexity: dense {metadata['evaluation']['dense']['perplexity']:.3f} -> pruned "
                     f"{after['perplexity']:.3f} ({after['tokens']} tokens of {after['data']['name']}/"
                     f"{after['data']['split']}, {'BOS first' if after['bos_prepended'] else 'no BOS'})")
    if "activation_sparsity" in metadata:
        lines += activation_summary(metadata["activation_sparsity"])
    emit(args, metadata, lines)
    return 0

