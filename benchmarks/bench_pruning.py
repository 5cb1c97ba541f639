"""One-shot pruning of the sample model: quality, pruning time and peak memory, side by side with llm-compressor.

    python benchmarks/bench_pruning.py                      # all methods x patterns, plus llm-compressor peers
    python benchmarks/bench_pruning.py --no-peer --configs sparsegpt:0.5
    python benchmarks/bench_pruning.py --update --configs wanda:0.5   # replace only these rows

Each pruning run is a fresh subprocess (`sparsellm prune`, or llm-compressor's `oneshot` in its own
virtual environment, see benchmarks/peers/setup_llmcompressor.sh) on exactly the same 64 x 512
calibration windows; its peak RSS comes from the OS (wait4). Pruning time is the wall time of the
pruning call itself (model loading excluded on both sides). Every result is scored by the same
sparsellm perplexity code under docs/PROTOCOL.md. Timed pairs (sparsellm vs peer) run interleaved,
`--repeats` times, and the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import sparsellm
from sparsellm.models import sample_model_path
from sparsellm.weights.oneshot import calibration_windows

HERE = Path(__file__).parent
PEER_PYTHON = HERE / "peers" / ".venv-llmcompressor" / "bin" / "python"
DEFAULT_CONFIGS = ["magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "magnitude:2:4", "wanda:2:4", "sparsegpt:2:4",
                   "magnitude:0.7", "wanda:0.7", "sparsegpt:0.7"]
PEER_CONFIGS = {"sparsegpt:0.5", "sparsegpt:2:4", "wanda:0.5", "sparsegpt:0.7"}
TIMED_PAIRS = {"sparsegpt:0.5", "wanda:0.5"}


def parse_config(config: str) -> tuple[str, str, float | None]:
    method, rest = config.split(":", 1)
    return (method, rest, None) if ":" in rest else (method, "unstructured", float(rest))


def run_sparsellm(config: str, workdir: Path, threads: int) -> dict:
    method, pattern, sparsity = parse_config(config)
    output = workdir / f"sparsellm-{config.replace(':', '_')}"
    command = [sys.executable, "-m", "sparsellm", "-q", "prune", "--model", "sample", "--method", method,
               "--pattern", pattern, "--nsamples", "64", "--seqlen", "512", "--output", str(output),
               "--overwrite", "--threads", str(threads), "--json"]
    if sparsity is not None:
        command += ["--sparsity", str(sparsity)]
    stdout, _, peak = run_peak_isolated(command)
    report = json.loads(stdout)
    return {"tool": "sparsellm", "config": config, "output": str(output), "seconds": report["seconds"],
            "peak_rss": peak, "blocks": report["blocks"]}


def run_peer(config: str, workdir: Path, windows_file: Path, threads: int) -> dict:
    method, pattern, sparsity = parse_config(config)
    output = workdir / f"llmcompressor-{config.replace(':', '_')}"
    command = [str(PEER_PYTHON), str(HERE / "peers" / "run_llmcompressor.py"), "--model", str(sample_model_path()),
               "--windows", str(windows_file), "--method", method, "--pattern", pattern, "--output", str(output),
               "--threads", str(threads), "--sparsity", str(sparsity if sparsity is not None else 0.5)]
    stdout, _, peak = run_peak_isolated(command)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"tool": "llm-compressor", "config": config, "output": str(output), "seconds": result["wall_seconds"],
            "peak_rss": peak}


def run_peak_isolated(command: list[str]) -> tuple[str, float, int]:
    """Run a command; return its stdout, wall seconds and peak RSS. A wrapper process runs it as its only
    child, so RUSAGE_CHILDREN in the wrapper is exactly this command's peak."""
    wrapper = [sys.executable, "-c", (
        "import json, resource, subprocess, sys;"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "sys.stderr.write(p.stderr[-3000:]);"
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout,"
        " 'peak': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))"
    ), *command]
    started = time.perf_counter()
    completed = subprocess.run(wrapper, capture_output=True, text=True)
    wall = time.perf_counter() - started
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["rc"]:
        sys.stderr.write(completed.stderr[-3000:])
        raise SystemExit(f"failed ({result['rc']}): {' '.join(command)}")
    return result["out"], wall, result["peak"]


def perplexity_of(folder: str) -> float:
    model, tokenizer = sparsellm.load_model(folder)
    return sparsellm.perplexity(model, tokenizer).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="method:sparsity or method:N:M")
    parser.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per sparsellm/peer pair")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(HERE / "results" / "pruning.json"))
    parser.add_argument("--update", action="store_true",
                        help="keep the other rows of an existing results file, replacing only the configs run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peer = not args.no_peer and PEER_PYTHON.exists()
    if not args.no_peer and not peer:
        print("llm-compressor venv missing: run benchmarks/peers/setup_llmcompressor.sh (continuing without it)")

    model, tokenizer = sparsellm.load_model("sample")
    dense_ppl = sparsellm.perplexity(model, tokenizer).perplexity
    windows, _ = calibration_windows(model, tokenizer, "builtin", 64, 512)
    del model
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        workdir = Path(tmp)
        windows_file = workdir / "windows.safetensors"
        save_file({"input_ids": windows.contiguous()}, str(windows_file))
        for config in args.configs:
            pair = peer and config in TIMED_PAIRS
            repeats = args.repeats if pair else 1
            ours, theirs = [], []
            for _ in range(repeats):
                ours.append(run_sparsellm(config, workdir, args.threads))
                if peer and config in PEER_CONFIGS:
                    theirs.append(run_peer(config, workdir, windows_file, args.threads))
            for runs in (ours, theirs):
                if not runs:
                    continue
                row = {"tool": runs[0]["tool"], "config": config,
                       "seconds_median": statistics.median(r["seconds"] for r in runs),
                       "seconds_all": [round(r["seconds"], 1) for r in runs],
                       "peak_rss_gb": max(r["peak_rss"] for r in runs) / 1e9,
                       "perplexity": perplexity_of(runs[-1]["output"])}
                if "blocks" in runs[-1]:
                    blocks = runs[-1]["blocks"]
                    row["per_block"] = {phase: statistics.mean(b.get(f"{phase}_seconds", 0.0) for b in blocks)
                                        for phase in ("collect", "solve", "propagate")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.update and Path(args.results).exists():
        fresh = {(row["tool"], row["config"]) for row in rows}
        kept = [row for row in json.loads(Path(args.results).read_text())["rows"]
                if (row["tool"], row["config"]) not in fresh]
        order = {config: index for index, config in enumerate(DEFAULT_CONFIGS)}
        rows = sorted(kept + rows, key=lambda row: (order.get(row["config"], len(order)), row["tool"] != "sparsellm"))
    results = {"dense_perplexity": dense_ppl, "rows": rows, "threads": args.threads}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [f"Dense perplexity: {results['dense_perplexity']:.3f}", "",
             "| method | pattern | tool | perplexity | pruning time (s, median) | peak RSS (GB) | per block: collect / solve / propagate (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        method, pattern, sparsity = parse_config(row["config"])
        shape = pattern if sparsity is None else f"{sparsity:.0%} unstructured"
        blocks = row.get("per_block")
        phases = " / ".join(f"{blocks[p]:.2f}" for p in ("collect", "solve", "propagate")) if blocks else ""
        lines.append(f"| {method} | {shape} | {row['tool']} | {row['perplexity']:.2f} | {row['seconds_median']:.1f} "
                     f"({', '.join(map(str, row['seconds_all']))}) | {row['peak_rss_gb']:.2f} | {phases} |")
    by_key = {(r["tool"], r["config"]): r for r in results["rows"]}
    ratios = []
    for config in sorted(TIMED_PAIRS):
        ours, theirs = by_key.get(("sparsellm", config)), by_key.get(("llm-compressor", config))
        if ours and theirs:
            ratios.append(f"- {config}: time ratio sparsellm / llm-compressor = "
                          f"{ours['seconds_median'] / theirs['seconds_median']:.2f}, peak RSS ratio = "
                          f"{ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}")
    return "\n".join([*lines, "", *ratios])


if __name__ == "__main__":
    main()
