"""Sparsity through training on the sample model: quality after a fixed training budget, and throughput.

    python benchmarks/bench_training.py baselines            # dense, one-shot SparseGPT at 70 %, 80 %, 2:4
    python benchmarks/bench_training.py run finetune 0.7 30  # METHOD TARGET MINUTES: one training run
    python benchmarks/bench_training.py throughput           # dense vs pruning training steps, interleaved
    python benchmarks/bench_training.py processes            # 1 process vs 2 (torchrun, gloo)
    python benchmarks/bench_training.py report               # the tables of docs/BENCHMARKS.md

Every phase appends to a JSON results file (``--results``) and the report reads it. Quality is
perplexity under docs/PROTOCOL.md (builtin evaluation split, 32 x 512) and on a second text no
run ever trains or calibrates on (stdlib docstrings, see heldout.py). Training data is the builtin
calibration split. A run's number of steps is set from the step time of a 3-step probe so that its
training takes MINUTES; the wall time actually spent is reported next to it. ``finetune`` and
``rigl`` start from the one-shot SparseGPT model of the baselines (its pruning time is listed
apart); ``gmp`` starts dense. All runs distil from the dense model unless ``--lm-only``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from heldout import stdlib_docstrings
from sparsellm.evaluation import perplexity
from sparsellm.models import load_model

HERE = Path(__file__).parent
TARGETS = {"0.7": ["--sparsity", "0.7"], "0.8": ["--sparsity", "0.8"], "2:4": ["--pattern", "2:4"]}


def cli(*args: str, threads: int = 2) -> list[str]:
    return [sys.executable, "-m", "sparsellm", "-q", *args, "--threads", str(threads)]


def run_logged(command: list[str], env: dict | None = None) -> tuple[str, float]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return result.stdout, time.perf_counter() - started


def evaluate(folder: str | Path, windows: int = 32) -> dict:
    torch.set_num_threads(2)
    model, tokenizer = load_model(folder)
    return {"builtin": perplexity(model, tokenizer, max_windows=windows).perplexity,
            "heldout": perplexity(model, tokenizer, data=stdlib_docstrings(), max_windows=windows).perplexity}


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def oneshot_folder(workdir: Path, target: str) -> Path:
    return workdir / f"sparsegpt-{target.replace(':', '_')}"


def baselines(args, results: dict) -> None:
    results["heldout"] = stdlib_docstrings().describe()
    results.setdefault("dense", evaluate("sample", args.eval_windows))
    for target, flags in TARGETS.items():
        folder = oneshot_folder(args.workdir, target)
        if target in results.get("oneshot", {}) and (folder / "config.json").exists():
            continue  # measured by an earlier run; the results file accumulates
        stdout, _ = run_logged(cli("prune", "--model", "sample", "--method", "sparsegpt", *flags, "--nsamples", "64",
                                   "--seqlen", "512", "--output", str(folder), "--overwrite", "--json"))
        results.setdefault("oneshot", {})[target] = {"seconds": json.loads(stdout)["seconds"]} | evaluate(
            folder, args.eval_windows)
        save_results(args.results, results)


def train_command(args, method: str, target: str, steps: int, output: Path) -> list[str]:
    model = "sample" if method == "gmp" else str(oneshot_folder(args.workdir, target))
    command = cli("train", "--model", model, "--method", method, *TARGETS[target], "--steps", str(steps),
                  "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen), "--lr", str(args.lr),
                  "--output", str(output), "--overwrite")
    return command + ([] if args.lm_only else ["--distill"])


def probe_step_seconds(args, method: str, target: str) -> float:
    probe = args.workdir / "probe"
    run_logged([*train_command(args, method, target, 3, probe), "--save-every", "0", "--no-plot"])
    records = [json.loads(line) for line in (probe / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(args.batch_size * args.seqlen / r["tokens_per_second"] for r in records[1:])


def run(args, results: dict) -> None:
    method, target, minutes = args.method, args.target, args.minutes
    name = f"{method}-{target}-{minutes:g}min" + ("-lm" if args.lm_only else "")
    step_seconds = probe_step_seconds(args, method, target)
    steps = max(3, int(minutes * 60 / step_seconds))
    output = args.workdir / name
    load_before = os.getloadavg()[0]
    run_logged(train_command(args, method, target, steps, output))
    metadata = json.loads((output / "sparsity.json").read_text())["training"]
    results.setdefault("runs", {})[name] = {
        "method": method, "target": target, "minutes": minutes, "distill": not args.lm_only, "lr": args.lr,
        "batch_size": args.batch_size, "seqlen": args.seqlen, "steps": steps, "tokens": metadata["tokens"],
        "train_seconds": metadata["seconds"], "tokens_per_second": metadata["tokens_per_second"],
        "probe_step_seconds": step_seconds, "init_seconds": results.get("oneshot", {}).get(target, {}).get("seconds")
        if method != "gmp" else None, "load_before": load_before, "load_after": os.getloadavg()[0],
    } | evaluate(output, args.eval_windows)
    save_results(args.results, results)


def throughput(args, results: dict) -> None:
    """Training steps with and without a Sparsifier on the same model and batches, interleaved."""
    from sparsellm.data import load_text, tokenize
    from sparsellm.training import Sparsifier, make_schedule

    torch.set_num_threads(2)
    model, tokenizer = load_model("sample")
    model.train()
    tokens = tokenize(tokenizer, load_text("builtin", "calibration"))
    batch = tokens[: args.batch_size * args.seqlen].view(args.batch_size, args.seqlen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    total = args.rounds * args.round_steps
    # GMP at the cadence of a 30-minute run (~90 steps of 4 x 512, an update every 3 steps).
    sparsifier = Sparsifier(model, make_schedule("gmp", 3 * total, 0.7, every=3), optimizer)
    times: dict[str, list[float]] = {"dense": [], "gmp": []}
    for _ in range(args.rounds):
        for mode in ("dense", "gmp"):
            for _ in range(args.round_steps):
                started = time.perf_counter()
                model(input_ids=batch, labels=batch).loss.backward()
                if mode == "gmp":
                    sparsifier.before_optimizer_step()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                if mode == "gmp":
                    sparsifier.after_optimizer_step()
                optimizer.zero_grad(set_to_none=True)
                times[mode].append(time.perf_counter() - started)
    tokens_per_step = args.batch_size * args.seqlen
    results["throughput"] = {
        mode: {"median_tokens_per_second": tokens_per_step / statistics.median(values),
               "mean_tokens_per_second": tokens_per_step / statistics.mean(values), "steps": len(values)}
        for mode, values in times.items()} | {"mask_updates": len(sparsifier.updates),
                                              "batch_size": args.batch_size, "seqlen": args.seqlen}
    save_results(args.results, results)


def processes(args, results: dict) -> None:
    """The same short GMP run as 1 process (2 threads) and as 2 torchrun processes (1 thread each)."""
    env = os.environ | {"SPARSELLM_NO_PROGRESS": "1"}
    base = ["train", "--model", "sample", "--method", "gmp", "--sparsity", "0.7", "--steps", str(args.round_steps),
            "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen), "--save-every", "0", "--no-plot"]
    found = {}
    for world in (1, 2):
        output = args.workdir / f"processes-{world}"
        if world == 1:
            command = cli(*base, "--output", str(output), "--overwrite")
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                       "sparsellm", "-q", *base, "--output", str(output), "--overwrite", "--threads", "1"]
        _, wall = run_logged(command, env)
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        found[str(world)] = {"median_tokens_per_second": statistics.median(r["tokens_per_second"] for r in records[1:]),
                        "wall_seconds": wall}
    one = load_file_weights(args.workdir / "processes-1")
    two = load_file_weights(args.workdir / "processes-2")
    found["max_weight_difference"] = max((one[k] - two[k]).abs().max().item() for k in one)
    results["processes"] = found | {"steps": args.round_steps, "batch_size": args.batch_size, "seqlen": args.seqlen}
    save_results(args.results, results)


def load_file_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def report(args, results: dict) -> None:
    dense = results["dense"]
    lines = [f"Held-out text: {results['heldout']['name']} ({results['heldout']['characters']:,} characters, "
             f"sha256 {results['heldout']['sha256_16']}).", "",
             "| model | target | training | tokens seen | wall (train) | ppl builtin | ppl held-out |",
             "|---|---|---|---|---|---|---|",
             f"| dense | - | - | - | - | {dense['builtin']:.2f} | {dense['heldout']:.2f} |"]
    for target, entry in results.get("oneshot", {}).items():
        lines.append(f"| SparseGPT one-shot | {target} | - | - | {entry['seconds']:.0f} s (pruning) | "
                     f"{entry['builtin']:.2f} | {entry['heldout']:.2f} |")
    for entry in sorted(results.get("runs", {}).values(), key=lambda e: (e["target"], -e["minutes"], e["method"])):
        start = "dense" if entry["method"] == "gmp" else f"SparseGPT ({entry['init_seconds']:.0f} s)"
        recipe = f"{entry['method']} from {start}" + (" + KD" if entry["distill"] else "")
        lines.append(f"| {recipe} | {entry['target']} | {entry['minutes']:g} min budget, {entry['steps']} steps | "
                     f"{entry['tokens']:,} | {entry['train_seconds'] / 60:.1f} min | {entry['builtin']:.2f} | "
                     f"{entry['heldout']:.2f} |")
    if "throughput" in results:
        speed = results["throughput"]
        dense_tps, gmp_tps = (speed[mode]["median_tokens_per_second"] for mode in ("dense", "gmp"))
        lines += ["", "| training step | tokens/s (median) | tokens/s (mean, with mask updates) |", "|---|---|---|",
                  f"| dense | {dense_tps:.1f} | {speed['dense']['mean_tokens_per_second']:.1f} |",
                  f"| GMP 70 % ({speed['mask_updates']} mask updates) | {gmp_tps:.1f} | "
                  f"{speed['gmp']['mean_tokens_per_second']:.1f} |",
                  f"| ratio GMP / dense | {gmp_tps / dense_tps:.3f} | "
                  f"{speed['gmp']['mean_tokens_per_second'] / speed['dense']['mean_tokens_per_second']:.3f} |"]
    if "processes" in results:
        found = results["processes"]
        lines += ["", "| processes | tokens/s (median step) | wall |", "|---|---|---|"]
        lines += [f"| {world} | {found[str(world)]['median_tokens_per_second']:.1f} | "
                  f"{found[str(world)]['wall_seconds']:.0f} s |" for world in (1, 2)]
        lines.append(f"\nLargest weight difference between the 1- and 2-process models: "
                     f"{found['max_weight_difference']:.2e}.")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["baselines", "run", "throughput", "processes", "report"])
    parser.add_argument("method", nargs="?", choices=["gmp", "rigl", "finetune"])
    parser.add_argument("target", nargs="?", choices=sorted(TARGETS))
    parser.add_argument("minutes", nargs="?", type=float)
    parser.add_argument("--lm-only", action="store_true", help="train on the LM loss alone (no distillation)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="throughput: interleaved rounds")
    parser.add_argument("--round-steps", type=int, default=4, help="throughput/processes: steps per round")
    parser.add_argument("--eval-windows", type=int, default=32, help="512-token windows per text (protocol: 32)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sparsellm-bench-training"))
    parser.add_argument("--results", type=Path, default=HERE / "results" / "training.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = load_results(args.results)
    if args.phase == "run" and None in (args.method, args.target, args.minutes):
        parser.error("run needs METHOD TARGET MINUTES")
    {"baselines": baselines, "run": run, "throughput": throughput, "processes": processes,
     "report": report}[args.phase](args, results)


if __name__ == "__main__":
    main()
