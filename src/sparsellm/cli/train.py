"""sparsellm train: prune while training (gmp, rigl) or fine-tune a pruned model (finetune), optionally distilled.

Runs unchanged as one process or under ``torchrun --nproc_per_node N -m sparsellm train ...`` /
``accelerate launch --multi_gpu --num_processes N -m sparsellm train ...`` (DistributedDataParallel,
gloo on CPU, nccl on GPU; FSDP is refused: masks need whole weight matrices).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os

from .. import checkpoint, models
from ..errors import SparseLLMError
from ..logging_utils import logger
from ..training import SCHEDULES, RunOptions, TrainConfig, prunable_layers, train
from ..training.distill import DEFAULT_PROMPTS
from ..training.distributed import join
from ..training.metrics import FORMATS
from ..weights import METHODS
from .common import add_eval, add_model, add_runtime, emit, eval_options
from .prune import load


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "train", help="train with sparsity: gradual pruning (gmp), RigL, or sparse fine-tuning (finetune)",
        description="Prune while training, or fine-tune a pruned model keeping its mask, optionally distilling "
                    "from the dense model. Works under torchrun / accelerate launch unchanged.")
    add_model(parser)
    parser.add_argument("--method", default="gmp", choices=sorted(SCHEDULES),
                        help="gmp: cubic gradual magnitude pruning; rigl: drop and regrow; finetune: fixed mask")
    parser.add_argument("--sparsity", type=float, default=None, help="final sparsity per layer, in [0, 1)")
    parser.add_argument("--pattern", default="unstructured", help="unstructured or N:M, e.g. 2:4")
    parser.add_argument("--distribution", default="uniform", choices=["uniform", "erk"],
                        help="per-layer sparsity: the same everywhere, or Erdős–Rényi (ERK)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step over all processes")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="windows per forward pass in one process (gradient accumulation)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per training window")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5 %% of --steps)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    parser.add_argument("--data", default="builtin",
                        help="training text (its calibration split): builtin, a .txt file or folder, a datasets "
                             "name; or 'teacher' for text the dense model writes itself")
    parser.add_argument("--teacher-windows", type=int, default=256, help="--data teacher: windows to generate")
    parser.add_argument("--prompts", help="--data teacher: a file with one prompt per line (default: built-in)")
    parser.add_argument("--distill", action="store_true", help="distil from the dense model (KL on logits)")
    parser.add_argument("--teacher", help="the dense teacher (default: the source recorded in a pruned folder's "
                                          "sparsity.json, else the dense --model itself)")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term (1 - alpha: LM loss)")
    parser.add_argument("--init", default=None, choices=sorted(METHODS),
                        help="rigl/finetune: one-shot method that prunes a dense model first (default sparsegpt)")
    parser.add_argument("--init-nsamples", type=int, default=64, help="calibration windows for --init")
    parser.add_argument("--ignore", action="append", default=[], metavar="REGEX", help="leave matching layers dense")
    parser.add_argument("--start", type=int, default=None, help="gmp: first pruning step t_0 (default 0)")
    parser.add_argument("--end", type=int, default=None,
                        help="gmp: step reaching the final sparsity; rigl: last mask update (default 3/4 of the run)")
    parser.add_argument("--update-every", type=int, default=None, help="steps between mask updates")
    parser.add_argument("--initial-sparsity", type=float, default=None, help="gmp: s_0 (default 0)")
    parser.add_argument("--drop-fraction", type=float, default=None, help="rigl: f_0 (default 0.3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="run folder: the final model, metrics, checkpoints")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    parser.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (0: none)")
    parser.add_argument("--save-minutes", type=float, default=10.0,
                        help="without --save-every: training minutes between checkpoints (default 10)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the last checkpoint at the end")
    parser.add_argument("--metrics", default="jsonl", choices=FORMATS, help="per-step metrics log format")
    parser.add_argument("--no-plot", action="store_true", help="skip training.png (loss and sparsity)")
    parser.add_argument("--eval", action="store_true", help="measure the final model's perplexity")
    add_eval(parser, prefix="eval-")
    add_runtime(parser)
    parser.set_defaults(run=run)


def _is_sparse(model) -> bool:
    layers = prunable_layers(model).values()
    zeros = sum(int((module.weight == 0).sum()) for module in layers)
    return zeros > 0.05 * sum(module.weight.numel() for module in layers)


def load_teacher(args: argparse.Namespace, model):
    """The dense teacher: --teacher, else the source a pruned folder names, else a copy of the dense model."""
    source = args.teacher
    if source is None and models.resolve_model(args.model).kind == "folder":
        source = (checkpoint.read_metadata(models.resolve_model(args.model).location) or {}).get("model")
    if source:
        logger.info("teacher: %s", source)
        teacher, _ = models.load_model(source, dtype=args.load_dtype)
        return teacher
    if _is_sparse(model):
        raise SparseLLMError("the model is already sparse and names no dense source: give the teacher with --teacher")
    return copy.deepcopy(model)


def config_from(args: argparse.Namespace) -> TrainConfig:
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as handle:
                prompts = tuple(line.rstrip("\n") for line in handle if line.strip())
        except OSError as exc:
            raise SparseLLMError(f"cannot read the prompts file {args.prompts}: {exc.strerror}") from exc
    return TrainConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern, distribution=args.distribution,
        steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, lr=args.lr, weight_decay=args.weight_decay,
        warmup=args.warmup, max_grad_norm=args.max_grad_norm, data=args.data, teacher_windows=args.teacher_windows,
        prompts=prompts, distill=args.distill, temperature=args.temperature, alpha=args.alpha, init=args.init,
        init_nsamples=args.init_nsamples, ignore=tuple(args.ignore), start=args.start, end=args.end,
        update_every=args.update_every, initial_sparsity=args.initial_sparsity, drop_fraction=args.drop_fraction,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    if args.offload_folder:
        raise SparseLLMError("train keeps the whole model in memory: --offload-folder is for prune and eval")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise SparseLLMError("sparsellm train runs DistributedDataParallel, not FSDP: launch with --multi_gpu")
    processes = join(args.device)
    if not processes.is_main:
        logger.setLevel(logging.WARNING)
    config = config_from(args)
    if not args.resume:
        checkpoint.check_output(args.output, args.overwrite)
    processes.barrier()  # every rank checks before rank 0 writes anything
    model, tokenizer = load(args)
    teacher = load_teacher(args, model) if args.distill or args.data == "teacher" else None
    evaluation = eval_options(args, "eval-") if args.eval else None
    options = RunOptions(micro_batch_size=args.micro_batch_size, save_every=args.save_every,
                         save_minutes=args.save_minutes,
                         keep_checkpoints=args.keep_checkpoints, metrics=args.metrics, plot=not args.no_plot,
                         device=args.device, evaluation=evaluation)
    result = train(model, tokenizer, config, args.output, teacher=teacher, options=options, resume=args.resume,
                   model_name=str(args.model))
    if not processes.is_main:
        return 0
    training = result.metadata["training"]
    lines = [f"trained {result.steps} steps of {config.method} {result.metadata['pattern']} on "
             f"{result.data['name']} ({result.tokens:,} tokens, {training['processes']} process"
             f"{'es' if training['processes'] > 1 else ''}): sparsity {result.sparsity:.4f}, loss "
             f"{result.final_loss:.3f}, {result.seconds:.0f} s, {result.tokens_per_second:.0f} tokens/s "
             f"-> {result.output}"]
    if "evaluation" in result.metadata:
        scored = result.metadata["evaluation"]
        lines.append(f"perplexity {scored['perplexity']:.3f} ({scored['tokens']} tokens of "
                     f"{scored['data']['name']}/{scored['data']['split']})")
    emit(args, result.metadata, lines)
    return 0
