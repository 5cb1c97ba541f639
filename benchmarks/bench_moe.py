"""Mixture-of-experts: layer throughput, MoEfied sample-model quality and decode speed, upcycled training.

    flock /tmp/sparsellm-heavy.lock python benchmarks/bench_moe.py            # everything (~2 h here)
    python benchmarks/bench_moe.py --parts layer decode                       # a subset

Parts (all at 2 torch threads, float32):

- ``layer``: tokens/s of an MoE layer (E = 8, top-1, 256 tokens per call, dropless) against dense
  gated MLPs with the same active parameters (one expert's width) and the same total parameters
  (8 experts' width); the three run interleaved, ratio of medians.
- ``moefy``: the sample model MoEfied into 16 experts (dense down projections, so that one
  conversion serves every k); perplexity under the protocol at 16, 8 and 4
  experts per token (100 / 50 / 25 % of the MLP neurons) with the least-squares router, and with
  routers trained for 8 and 4 experts; calibration 32 x 512 tokens (the first windows of the
  protocol's calibration split).
- ``decode``: one token through all 30 MLPs, dense vs MoEfied at 50 % and 25 % (interleaved medians).
- ``distill``: the sample model MoEfied at half of ``--distill-experts`` experts (50 %, least-squares
  router, the experts' down projections refitted to the dense output unless ``--no-refit-down``),
  then its experts distilled from the dense model (KL from its next-token distribution on the
  calibration split's 256-token windows, plus ``--distill-teacher-windows`` windows the dense model
  writes as continuations of their first 16 tokens, plus the calibration split of ``--distill-extra``
  when given; peak lr ``--distill-lr``, cosine decay; ``--distill-minutes`` caps the part);
  perplexity under the protocol before and after, the KL per step. ``--device cuda`` runs this
  part on a GPU (TensorFloat-32 products), where long runs take minutes instead of hours.
- ``upcycle``: the sample model upcycled (8 experts, top-2, every other block as in Switch), trained
  for a few steps with and without the load-balancing loss; loss curves and expert usage plotted.

Results go to ``--output`` (default benchmarks/results/moe): results.json and the plots.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparsellm
from sparsellm.activations.moe import MoEConfig, MoELayer, pack_experts, set_top_k
from sparsellm.activations.moe.modeling import gated_mlp
from sparsellm.activations.moe.moefy import moefy
from sparsellm.activations.moe.speed import decode_mlp_seconds
from sparsellm.activations.moe.train import distill_experts, plot_training, train
from sparsellm.activations.moe.upcycle import upcycle
from sparsellm.models import decoder_blocks

HERE = Path(__file__).parent


class GatedMLP(nn.Module):
    """A dense gated MLP with fused gate/up, the same arithmetic as one expert."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@torch.no_grad()
def bench_layer(hidden: int, width: int, experts: int, tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    moe = MoELayer(hidden, MoEConfig(experts, width, top_k=1)).eval().pack_()  # experts in the kernels' layout
    same_active, same_total = GatedMLP(hidden, width).eval(), GatedMLP(hidden, experts * width).eval()
    x = torch.randn(tokens, hidden)
    layers = {"moe": moe, "dense_same_active": same_active, "dense_same_total": same_total}
    times: dict[str, list[float]] = {name: [] for name in layers}
    for repeat in range(repeats + 3):
        for name, layer in layers.items():
            started = time.perf_counter()
            layer(x)
            if repeat >= 3:
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    counts = moe.last_routing.expert_counts().tolist()
    return {"hidden": hidden, "expert_width": width, "experts": experts, "tokens": tokens,
            "tokens_per_s": {name: tokens / seconds for name, seconds in medians.items()},
            "moe_vs_same_active": medians["dense_same_active"] / medians["moe"],
            "moe_vs_same_total": medians["dense_same_total"] / medians["moe"],
            "tokens_per_expert": counts}


def perplexity(model, tokenizer, windows: int) -> float:
    return sparsellm.perplexity(model, tokenizer, max_windows=windows).perplexity


def bench_moefy(args, results: dict) -> None:
    model, tokenizer = sparsellm.load_model("sample")
    dense_mlps = [copy.deepcopy(gated_mlp(block)) for block in decoder_blocks(model)[1]]
    results["dense_ppl"] = perplexity(model, tokenizer, args.windows)
    rows = results.setdefault("moefy", [])
    untrained = copy.deepcopy(model)
    report = moefy(untrained, tokenizer, 16, 4, router_steps=0, refit_down=False, nsamples=args.nsamples)
    pack_experts(untrained)  # inference from here on: the experts in the MoE kernels' layout
    decode_stacks = {"dense": dense_mlps}
    for top_k in (16, 12, 8, 4):
        set_top_k(untrained, top_k)
        rows.append({"router": "least squares", "top_k": top_k, "share": top_k / 16,
                     "ppl": perplexity(untrained, tokenizer, args.windows), "moefy_seconds": report.seconds,
                     "router_recall": _mean_recall(report) if top_k == 4 else None})
    del untrained
    for top_k in (8, 4):
        trained = copy.deepcopy(model)
        report = moefy(trained, tokenizer, 16, top_k, router_steps=args.router_steps, refit_down=False,
                       nsamples=args.nsamples)
        pack_experts(trained)
        rows.append({"router": f"trained ({args.router_steps} steps)", "top_k": top_k, "share": top_k / 16,
                     "ppl": perplexity(trained, tokenizer, args.windows), "moefy_seconds": report.seconds,
                     "router_recall": _mean_recall(report)})
        decode_stacks[f"moe_{100 * top_k // 16}pct"] = [block.mlp for block in decoder_blocks(trained)[1]]
    if "decode" in args.parts:
        torch.set_num_threads(args.threads)
        seconds = decode_mlp_seconds(decode_stacks, model.config.hidden_size, repeats=args.decode_repeats)
        results["decode"] = {name: {"ms": value * 1e3, "speedup_vs_dense": seconds["dense"] / value}
                             for name, value in seconds.items()}
    _plot_moefy(results, args.output)


def _mean_recall(report) -> float:
    return sum(layer.router_recall for layer in report.layers) / len(report.layers)


def _plot_moefy(results: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for router in sorted({row["router"] for row in results["moefy"]}):
        rows = sorted((r for r in results["moefy"] if r["router"] == router), key=lambda r: r["share"])
        axis.plot([100 * r["share"] for r in rows], [r["ppl"] for r in rows], marker="o", label=router)
    axis.axhline(results["dense_ppl"], color="grey", linestyle="--", label="dense")
    axis.axhline(1.25 * results["dense_ppl"], color="tab:red", linestyle=":", label="dense + 25 %")
    axis.set(xlabel="MLP neurons used per token (%)", ylabel="perplexity (protocol)", yscale="log",
             title="MoEfied SmolLM2-135M, 16 experts")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / "moefy_perplexity.png", dpi=120)
    plt.close(figure)


def bench_distill(args, results: dict) -> None:
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")
    started = time.perf_counter()
    model, tokenizer = sparsellm.load_model("sample")
    teacher = copy.deepcopy(model).eval().to(args.device)
    dense = perplexity(teacher, tokenizer, args.windows)
    experts = args.distill_experts
    moefy(model, tokenizer, experts, experts // 2, router_steps=0, refit_down=args.refit_down,
          nsamples=args.nsamples, device=args.device)
    model.to(args.device)
    evaluation_started = time.perf_counter()
    before = perplexity(model, tokenizer, args.windows)
    evaluation_seconds = time.perf_counter() - evaluation_started
    print(f"distill: dense ppl {dense:.3f}, MoEfied {before:.3f} before training", flush=True)
    time_limit = None
    if args.distill_minutes:  # for the whole part: the training gets what is left after a reserve for the last evaluation
        time_limit = 60 * args.distill_minutes - (time.perf_counter() - started) - 2 * evaluation_seconds - 10
    log = distill_experts(model, teacher, tokenizer, steps=args.distill_steps, lr=args.distill_lr,
                          batch_size=args.distill_batch_size, teacher_windows=args.distill_teacher_windows,
                          extra_data=args.distill_extra, time_limit=time_limit)
    kl = [s["task_loss"] for s in log.steps]
    results["distill"] = {
        "top_k": experts // 2, "experts": experts, "refit_down": args.refit_down, "share": 0.5,
        "device": args.device, "teacher_windows": args.distill_teacher_windows, "extra_data": args.distill_extra,
        "batch_size": args.distill_batch_size, "steps": len(log.steps), "steps_asked": args.distill_steps,
        "minutes": args.distill_minutes, "lr": log.lr,
        "lr_schedule": log.lr_schedule,
        "tokens": log.tokens, "seconds": log.seconds, "dense_ppl": dense, "ppl_before": before,
        "ppl_after": perplexity(model, tokenizer, args.windows),
        "kl_first5": statistics.mean(kl[:5]), "kl_last5": statistics.mean(kl[-5:]), "kl": kl,
    }


def _plot_distill(row: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(range(1, len(row["kl"]) + 1), row["kl"], color="tab:blue", alpha=0.3, label="per step")
    smooth = [statistics.mean(row["kl"][max(0, i - 19) : i + 1]) for i in range(len(row["kl"]))]
    axis.plot(range(1, len(smooth) + 1), smooth, color="tab:blue", label="moving mean of 20")
    axis.set(xlabel="step", ylabel="KL from the dense model (nats per token)",
             title=f"SmolLM2-135M, {row['top_k']} of {row['experts']} experts, distilled: perplexity {row['ppl_before']:.1f} -> "
                   f"{row['ppl_after']:.1f} (dense {row['dense_ppl']:.1f})")
    axis.title.set_fontsize(9)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(folder / "distill_kl.png", dpi=120)
    plt.close(figure)


def bench_upcycle(args, results: dict) -> None:
    runs = {}
    for weight in (args.balance_weight, 0.0):
        model, tokenizer = sparsellm.load_model("sample")
        report = upcycle(model, 8, 2, every=2, seed=0)
        log = train(model, tokenizer, steps=args.train_steps, batch_size=args.train_batch_size,
                    seqlen=args.train_seqlen, lr=args.lr, balance_weight=weight, z_weight=0.001, seed=0)
        label = f"balance weight {weight:g}"
        runs[label] = log
        share = log.usage.float() / log.usage.sum(dim=1, keepdim=True)
        results.setdefault("upcycle", []).append({
            "balance_weight": weight, "moe_layers": len(report["layers"]), "steps": args.train_steps,
            "tokens": log.tokens, "seconds": log.seconds,
            "lm_loss_first5": statistics.mean(s["task_loss"] for s in log.steps[:5]),
            "lm_loss_last5": statistics.mean(s["task_loss"] for s in log.steps[-5:]),
            "balance_loss_last5": statistics.mean(s["balance_loss"] for s in log.steps[-5:]),
            "max_expert_share": share.max().item(), "min_expert_share": share.min().item(),
            "ppl_after": perplexity(model, tokenizer, args.windows),
        })
        del model
    plot_training(runs, args.output)


def save(results: dict, path: Path) -> None:
    """Write after every part, so a run cut short keeps what it measured."""
    path.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["layer", "moefy", "decode", "distill", "upcycle"],
                        choices=["layer", "moefy", "decode", "distill", "upcycle"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per layer in the layer part")
    parser.add_argument("--decode-repeats", type=int, default=50)
    parser.add_argument("--nsamples", type=int, default=32, help="MoEfication calibration windows of 512")
    parser.add_argument("--router-steps", type=int, default=300)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--train-seqlen", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--distill-lr", type=float, default=3e-4, help="peak learning rate (cosine decay)")
    parser.add_argument("--distill-experts", type=int, default=32, help="experts of the distilled model (half used)")
    parser.add_argument("--distill-batch-size", type=int, default=4, help="windows of 256 tokens per step")
    parser.add_argument("--distill-teacher-windows", type=int, default=0,
                        help="windows the dense model writes for the distillation, besides the calibration split")
    parser.add_argument("--distill-extra", default=None, metavar="CORPUS",
                        help="distil on this corpus's calibration split too (docstrings: the stdlib's, offline)")
    parser.add_argument("--distill-minutes", type=float, default=None,
                        help="cap the distill part's time, from its start (load, MoEfy, write, train, evaluate; "
                             "not the interpreter's start-up): the training plans as many of the steps as fit")
    parser.add_argument("--device", default="cpu", help="distill part: where to MoEfy, train and evaluate")
    parser.add_argument("--no-refit-down", dest="refit_down", action="store_false",
                        help="distill part: keep the dense down projections (default: refit by least squares)")
    parser.add_argument("--balance-weight", type=float, default=0.01)
    parser.add_argument("--windows", type=int, default=32, help="perplexity windows (protocol: 32)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "moe")
    args = parser.parse_args()
    sparsellm.logging_utils.configure()  # progress on stderr: a run on a lent GPU shows how far it got
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    # parts run separately add up in one results.json: a run replaces only the parts it ran
    saved = args.output / "results.json"
    results: dict = json.loads(saved.read_text()) if saved.exists() else {}
    results.update({"threads": args.threads, "parts": sorted(set(results.get("parts", [])) | set(args.parts))})
    producers = {"layer": {"layer"}, "moefy": {"moefy", "decode"}, "dense_ppl": {"moefy", "decode"},
                 "decode": {"decode"}, "distill": {"distill"}, "upcycle": {"upcycle"}}  # the decode part MoEfies the model again
    for key, parts in producers.items():
        if parts & set(args.parts):
            results.pop(key, None)
    if "layer" in args.parts:
        results["layer"] = [bench_layer(576, 1536, 8, 256, args.repeats),
                            bench_layer(2048, 5632, 8, 256, max(10, args.repeats // 5))]
        for row in results["layer"]:
            print(f"layer H={row['hidden']} F={row['expert_width']}: MoE {row['tokens_per_s']['moe']:.0f} tok/s, "
                  f"{row['moe_vs_same_active']:.2f}x same-active dense, {row['moe_vs_same_total']:.2f}x same-total",
                  flush=True)
        save(results, saved)
    if "moefy" in args.parts or "decode" in args.parts:
        bench_moefy(args, results)
        for row in results["moefy"]:
            print(f"moefy {row['router']} top-{row['top_k']}: ppl {row['ppl']:.3f} "
                  f"(dense {results['dense_ppl']:.3f})", flush=True)
        if "decode" in results:
            print("decode:", json.dumps(results["decode"]), flush=True)
        save(results, saved)
    if "distill" in args.parts:
        bench_distill(args, results)
        row = results["distill"]
        print(f"distill: {row['top_k']} of {row['experts']} experts, ppl {row['ppl_before']:.3f} -> {row['ppl_after']:.3f} after "
              f"{row['steps']} steps (dense {row['dense_ppl']:.3f})", flush=True)
        save(results, saved)
        _plot_distill(row, args.output)  # after the save: the numbers outlive a plotting failure
    if "upcycle" in args.parts:
        bench_upcycle(args, results)
        for row in results["upcycle"]:
            print("upcycle:", json.dumps(row), flush=True)
        save(results, saved)


if __name__ == "__main__":
    main()
