"""sparsellm moefy: split every MLP of a dense model into experts and route each token to k of them."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

from .. import checkpoint, evaluation
from ..activations.moe import moe_layers, pack_experts
from ..activations.moe.modeling import gated_mlp
from ..activations.moe.moefy import CLUSTERINGS, moefy
from ..activations.moe.speed import decode_mlp_seconds
from ..activations.moe.train import distill_experts
from ..models import decoder_blocks
from .common import add_eval, add_model, add_runtime, emit, eval_options
from .prune import load


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "moefy", help="MoEfication: split each MLP into equal experts, k per token",
        description="Cluster each gated MLP's neurons into equal experts and fit a router per block, "
                    "one block at a time on calibration text.")
    add_model(parser)
    parser.add_argument("--experts", type=int, default=16, help="experts per MLP (must divide its width)")
    parser.add_argument("--top-k", type=int, default=4, help="experts each token runs (default 4)")
    parser.add_argument("--cluster", default="coactivation", choices=CLUSTERINGS,
                        help="group neurons that fire together (coactivation) or with similar weights")
    parser.add_argument("--router-steps", type=int, default=0,
                        help="Adam steps per block that train the router to pick each token's best experts")
    parser.add_argument("--router-lr", type=float, default=1e-3, help="router training learning rate")
    parser.add_argument("--no-refit-down", dest="refit_down", action="store_false",
                        help="keep the dense down projections (default: refit them by least squares so that each "
                             "token's chosen experts add up to the dense MLP's output on the calibration tokens)")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="then train the experts this many steps to match the dense model (distillation "
                             "on the calibration split's windows; default 0: none)")
    parser.add_argument("--distill-lr", type=float, default=3e-4,
                        help="peak learning rate of the distillation (cosine decay to a tenth of it)")
    parser.add_argument("--distill-batch-size", type=int, default=4, help="windows per distillation step")
    parser.add_argument("--distill-seqlen", type=int, default=256, help="tokens per distillation window")
    parser.add_argument("--distill-teacher-windows", type=int, default=0,
                        help="windows the dense model writes to distil on, besides the calibration text "
                             "(continuations of its windows' first tokens; more text, less overfitting on long runs)")
    parser.add_argument("--distill-extra", default=None, metavar="CORPUS",
                        help="distil on this text's calibration split too (e.g. docstrings: the standard library's "
                             "docstrings, offline; or a .txt file)")
    parser.add_argument("--distill-minutes", type=float, default=None,
                        help="cap the distillation's time (the teacher's writing and the training): as many of "
                             "the steps as fit, the learning rate decaying over those (default: no cap)")
    add_moe_common(parser)
    parser.add_argument("--calib", default="builtin",
                        help="calibration text: builtin, a .txt file or folder, or a datasets name (online)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clustering")
    add_eval(parser, prefix="eval-")
    add_runtime(parser)
    parser.set_defaults(run=run)


def add_moe_common(parser: argparse.ArgumentParser) -> None:
    """Options moefy and upcycle share."""
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="cap each expert at factor * k * tokens / experts per forward call (default: dropless)")
    parser.add_argument("--output", required=True, help="folder for the MoE model")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--eval", action="store_true", help="measure perplexity before and after")
    parser.add_argument("--measure-decode", action="store_true",
                        help="time one token through all MLPs, dense vs MoE (interleaved medians)")


def convert_and_save(args: argparse.Namespace, convert: Callable) -> tuple[dict, list[str]]:
    """The frame moefy and upcycle share: load, (evaluate), ``convert(model, tokenizer)`` -> (metadata,
    lines), (evaluate again, time one token through the MLPs dense vs MoE), save."""
    checkpoint.check_output(args.output, args.overwrite)
    model, tokenizer = load(args)
    options = eval_options(args, "eval-")
    before = evaluation.perplexity(model, tokenizer, **options) if args.eval else None
    dense = [copy.deepcopy(gated_mlp(block)) for block in decoder_blocks(model)[1]] if args.measure_decode else None
    metadata, lines = convert(model, tokenizer)
    metadata = {"model": str(args.model)} | metadata
    pack_experts(model)  # the experts in the MoE kernels' layout for the evaluation and timing (saved as before)
    if before is not None:
        after = evaluation.perplexity(model, tokenizer, **options)
        metadata["evaluation"] = {"dense": before.to_dict(), "moe": after.to_dict()}
        lines.append(f"perplexity: dense {before.perplexity:.3f} -> MoE {after.perplexity:.3f} "
                     f"({after.tokens} tokens of {after.data['name']}/{after.data['split']})")
    if dense is not None:
        blocks = decoder_blocks(model)[1]
        seconds = decode_mlp_seconds({"dense": dense, "moe": [block.mlp for block in blocks]},
                                     model.config.hidden_size, dtype=next(model.parameters()).dtype)
        ratio = seconds["dense"] / seconds["moe"]
        metadata["decode_mlp"] = {"dense_ms": seconds["dense"] * 1e3, "moe_ms": seconds["moe"] * 1e3,
                                  "speedup": ratio}
        lines.append(f"decode MLP time per token (all {len(blocks)} blocks): dense {seconds['dense'] * 1e3:.2f} ms, "
                     f"MoE {seconds['moe'] * 1e3:.2f} ms ({ratio:.2f}x)")
    checkpoint.save(model, tokenizer, args.output, metadata, overwrite=args.overwrite)
    return metadata, lines


def run(args: argparse.Namespace) -> int:
    def convert(model, tokenizer):
        teacher = copy.deepcopy(model).eval() if args.distill_steps else None  # the dense model, kept
        report = moefy(model, tokenizer, args.experts, args.top_k, cluster=args.cluster,
                       router_steps=args.router_steps, router_lr=args.router_lr,
                       refit_down=args.refit_down, capacity_factor=args.capacity_factor, calib=args.calib,
                       nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
                       device=args.device, seed=args.seed)
        recall = sum(layer.router_recall for layer in report.layers) / len(report.layers)
        lines = [f"MoEfied {len(moe_layers(model))} MLPs into {args.experts} experts of "
                 f"{report.moe['expert_size']} neurons, top-{args.top_k} per token: a token runs "
                 f"{100 * report.active_share:.1f} % of each MLP's weights (router recall {recall:.3f}) "
                 f"in {report.seconds:.1f} s -> {args.output}"]
        metadata = report.to_dict()
        if args.distill_steps:
            if args.device:  # the distillation runs where the blocks were computed; the rest on the CPU
                model.to(args.device)
                teacher.to(args.device)
            log = distill_experts(model, teacher, tokenizer, steps=args.distill_steps, lr=args.distill_lr,
                                  batch_size=args.distill_batch_size, seqlen=args.distill_seqlen, data=args.calib,
                                  teacher_windows=args.distill_teacher_windows, extra_data=args.distill_extra,
                                  time_limit=None if args.distill_minutes is None else 60 * args.distill_minutes)
            metadata["distillation"] = log.to_dict() | {"teacher_windows": args.distill_teacher_windows,
                                                        "extra_data": args.distill_extra}
            model.to("cpu")
            done = f"{len(log.steps)}" + (f" of {args.distill_steps}" if len(log.steps) < args.distill_steps else "")
            lines.append(f"distilled the experts from the dense model: {done} steps in {log.seconds:.0f} s, "
                         f"KL {log.steps[0]['task_loss']:.3f} -> {log.steps[-1]['task_loss']:.3f}")
        return metadata, lines

    metadata, lines = convert_and_save(args, convert)
    emit(args, metadata, lines)
    return 0
