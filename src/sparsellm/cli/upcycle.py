"""sparsellm upcycle: a dense model's MLPs become MoE layers whose experts start as copies; optionally train."""

from __future__ import annotations

import argparse

from ..activations.moe.train import plot_training, train
from ..activations.moe.upcycle import upcycle
from .common import add_eval, add_model, add_runtime, emit
from .moefy import add_moe_common, convert_and_save


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "upcycle", help="sparse upcycling: MLPs -> MoE layers of copies, ready to train",
        description="Replace MLPs by MoE layers whose experts are copies of the dense MLP and whose router "
                    "starts as noise; with --train-steps, train with the load-balancing and z-losses.")
    add_model(parser)
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts each token runs (default 2)")
    parser.add_argument("--every", type=int, default=1,
                        help="make every N-th block MoE, counting from the last (default 1: all; Switch: 2)")
    parser.add_argument("--weighting", default="normalized", choices=["normalized", "softmax"],
                        help="scale expert outputs by router probabilities renormalised over the k chosen "
                             "(output equals the dense model's at the start) or by the raw probabilities")
    parser.add_argument("--router-std", type=float, default=0.02, help="std of the random router init")
    parser.add_argument("--expert-noise", type=float, default=0.0,
                        help="relative noise on each expert copy (0: identical experts)")
    parser.add_argument("--jitter", type=float, default=0.0, help="router input jitter while training")
    parser.add_argument("--seed", type=int, default=0)
    add_moe_common(parser)
    parser.add_argument("--train-steps", type=int, default=0, help="train this many steps after upcycling")
    parser.add_argument("--data", default="builtin", help="training text (its calibration split)")
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--train-seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--balance-weight", type=float, default=0.01, help="weight of the load-balancing loss")
    parser.add_argument("--z-weight", type=float, default=0.001, help="weight of the router z-loss")
    parser.add_argument("--only-moe", action="store_true", help="train the routers and experts only")
    add_eval(parser, prefix="eval-")
    add_runtime(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logs = []

    def convert(model, tokenizer):
        metadata = upcycle(model, args.experts, args.top_k, every=args.every, capacity_factor=args.capacity_factor,
                           weighting=args.weighting, router_std=args.router_std, expert_noise=args.expert_noise,
                           jitter=args.jitter, seed=args.seed)
        lines = [f"upcycled {len(metadata['layers'])} MLPs into {args.experts} experts, top-{args.top_k} per "
                 f"token: {args.experts}x the MLP parameters, a token runs {args.top_k}x a dense MLP -> {args.output}"]
        if args.train_steps:
            log = train(model, tokenizer, data=args.data, steps=args.train_steps, batch_size=args.train_batch_size,
                        seqlen=args.train_seqlen, lr=args.lr, balance_weight=args.balance_weight,
                        z_weight=args.z_weight, only_moe=args.only_moe, seed=args.seed)
            logs.append(log)
            metadata["training"] = log.to_dict()
            first, last = log.steps[0], log.steps[-1]
            lines.append(f"trained {args.train_steps} steps ({log.tokens} tokens, {log.seconds:.0f} s): LM loss "
                         f"{first['task_loss']:.3f} -> {last['task_loss']:.3f}, balance loss "
                         f"{first['balance_loss']:.3f} -> {last['balance_loss']:.3f} (plots in {args.output})")
        return metadata, lines

    metadata, lines = convert_and_save(args, convert)
    if logs:
        plot_training({f"balance weight {args.balance_weight:g}": logs[0]}, args.output)
    emit(args, metadata, lines)
    return 0
