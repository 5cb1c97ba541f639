"""Per-layer sparsity allocation on the sample model at 70 % unstructured, and the perplexity-target search.

    flock /tmp/sparsellm-heavy.lock python benchmarks/bench_allocation.py          # everything (~1 h on 2 cores)
    python benchmarks/bench_allocation.py --only sparsegpt:owl,wanda:owl           # some rows
    python benchmarks/bench_allocation.py --table                                  # print the tables again

Rows (docs/PROTOCOL.md: 64 x 512 calibration tokens, perplexity on 32 x 512 evaluation tokens):
- ``METHOD:ALLOCATION`` at 70 %: uniform, OWL (M 5, lambda 0.08) and sensitivity, for SparseGPT and Wanda.
  OWL and sensitivity statistics are measured once on the dense model and reused by both methods
  (``Allocation`` objects keep what they measured); the time of that pass is reported apart.
- ``owl-grid``: OWL's M and lambda chosen on held-out calibration windows (the 16 after the 64
  calibration windows; never the evaluation text) by ``tune_owl`` (what ``--owl-tune`` runs), each
  candidate pruned with Wanda from one set of dense statistics; ``METHOD:owl-tuned`` then runs the
  chosen pair under the protocol.
- ``search``: ``--max-ppl-increase 10%`` with Wanda (uniform), every candidate listed.
- ``sweep``: the exhaustive reference, Wanda (uniform) pruned from scratch on the 2 % grid from 50 % (``--sweep-start``)
  down to the first point within the limit, and one more (perplexity falls with sparsity, so the
  first passing point is the sweep's best and everything above it was tried).

Each row's pruned folder is saved under ``--workdir`` (``sparsellm report`` draws them); results
accumulate in ``--results`` so a rerun only computes the missing rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import sparsellm
from sparsellm.evaluation import perplexity
from sparsellm.weights.allocation import get_allocation
from sparsellm.weights.allocation.owl import tune_owl
from sparsellm.weights.search import sparsest_within

HERE = Path(__file__).parent
ROWS = ["sparsegpt:uniform", "sparsegpt:owl", "sparsegpt:sensitivity", "wanda:uniform", "wanda:owl",
        "wanda:sensitivity", "owl-grid", "sparsegpt:owl-tuned", "wanda:owl-tuned", "search", "sweep"]
HELD_OUT = 16  # calibration windows after the 64 used for calibration: OWL's grid is scored on them
TARGET, LIMIT, SWEEP_STEP = 0.7, 0.10, 0.02
COMMON = "--model sample --sparsity 0.7 --nsamples 64 --seqlen 512 --eval --threads 2"


def command(row: str, results: dict | None = None) -> str:
    if row == "owl-grid":
        return "python benchmarks/bench_allocation.py --only owl-grid"
    if row.endswith(":owl-tuned"):
        best = (results or {}).get("owl-grid", {}).get("best", {})
        return (f"sparsellm prune {COMMON} --method {row.split(':')[0]} --allocation owl "
                f"--owl-m {best.get('m', 'M')} --owl-lambda {best.get('lam', 'L')} --output OUT")
    if row == "search":
        return ("sparsellm prune --model sample --method wanda --max-ppl-increase 10% --search-step 0.01 "
                "--threads 2 --output OUT")
    if row == "sweep":
        return "sparsellm prune --model sample --method wanda --sparsity S --eval --threads 2 --output OUT"
    method, allocation = row.split(":")
    return f"sparsellm prune {COMMON} --method {method} --allocation {allocation} --output OUT"


class Bench:
    def __init__(self, workdir: Path, results: Path, sweep_start: float = 0.5):
        self.workdir, self.results_path, self.sweep_start = workdir, results, sweep_start
        self.results = json.loads(results.read_text()) if results.exists() else {}
        self.strategies = {}  # allocation name -> measured strategy, shared by both methods
        self.dense = None

    def save(self) -> None:
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        self.results_path.write_text(json.dumps(self.results, indent=2))

    def fresh_model(self):
        return sparsellm.load_model("sample")

    def dense_perplexity(self) -> float:
        if "dense" not in self.results:
            model, tokenizer = self.fresh_model()
            self.results["dense"] = perplexity(model, tokenizer).perplexity
            self.save()
        return self.results["dense"]

    def run_ratio(self, row: str) -> dict:
        method, allocation = row.split(":")
        model, tokenizer = self.fresh_model()
        if allocation == "owl-tuned":
            best = self.results["owl-grid"]["best"]
            self.strategies.setdefault(allocation, get_allocation("owl", m=best["m"], lam=best["lam"]))
        strategy = self.strategies.get(allocation) or get_allocation(allocation)
        measured_before = bool(strategy.statistics())
        started = time.perf_counter()
        report = sparsellm.prune(model, tokenizer, method=method, sparsity=TARGET, allocation=strategy)
        seconds = time.perf_counter() - started
        self.strategies[allocation] = strategy
        ppl = perplexity(model, tokenizer)
        metadata = report.to_dict() | {"evaluation": {"dense": {"perplexity": self.dense_perplexity()},
                                                      "pruned": ppl.to_dict()}}
        sparsellm.save(model, tokenizer, self.workdir / row.replace(":", "-"), metadata, overwrite=True)
        return {"row": row, "perplexity": ppl.perplexity, "achieved_sparsity": report.achieved_sparsity,
                "seconds": seconds, "statistics_reused": measured_before,
                "allocation_seconds": report.allocation["seconds"],
                "allocation_range": [min(r.target for r in report.layers), max(r.target for r in report.layers)]}

    def run_owl_grid(self) -> dict:
        model, tokenizer = self.fresh_model()
        started = time.perf_counter()
        tuned = tune_owl(model, tokenizer, TARGET, held_out=HELD_OUT)
        return {"row": "owl-grid", "grid": tuned.grid, "best": tuned.best, "seconds": time.perf_counter() - started,
                "outlier_ratios": tuned.owl.statistics()["outlier_ratio"]}

    def run_search(self) -> dict:
        model, tokenizer = self.fresh_model()
        started = time.perf_counter()
        found = sparsest_within(model, tokenizer, LIMIT, method="wanda", step=0.01)
        seconds = time.perf_counter() - started
        metadata = (found.report.to_dict() if found.report else {}) | {
            "search": found.to_dict(),
            "evaluation": {"dense": {"perplexity": found.dense_perplexity}, "pruned": found.evaluation}}
        sparsellm.save(model, tokenizer, self.workdir / "search", metadata, overwrite=True)
        return {"row": "search", "chosen": found.chosen, "perplexity": found.evaluation["perplexity"],
                "increase": found.evaluation["perplexity"] / found.dense_perplexity - 1, "seconds": seconds,
                "candidates": found.to_dict()["candidates"]}

    def run_sweep(self) -> dict:
        """Wanda from scratch on the 2 % grid, from ``sweep_start`` down to the first point within the limit,
        and one point further (perplexity must keep falling: the first passing point is the best). The
        start must itself miss the limit, so that nothing above it could pass."""
        dense = self.dense_perplexity()
        points, started = [], time.perf_counter()
        step = round(self.sweep_start / SWEEP_STEP)
        while step > 0 and sum(p["increase"] <= LIMIT for p in points) < 2:
            sparsity = round(step * SWEEP_STEP, 4)
            model, tokenizer = self.fresh_model()
            sparsellm.prune(model, tokenizer, method="wanda", sparsity=sparsity)
            ppl = perplexity(model, tokenizer).perplexity
            points.append({"sparsity": sparsity, "perplexity": ppl, "increase": ppl / dense - 1})
            print(json.dumps(points[-1]), flush=True)
            step -= 1
        points.sort(key=lambda p: p["sparsity"])
        passing = [p["sparsity"] for p in points if p["increase"] <= LIMIT]
        return {"row": "sweep", "start": self.sweep_start, "points": points, "best": max(passing, default=0.0),
                "seconds": time.perf_counter() - started}

    def run(self, row: str) -> None:
        if row in self.results:
            return
        self.dense_perplexity()
        runs = {"search": self.run_search, "sweep": self.run_sweep, "owl-grid": self.run_owl_grid}
        result = runs.get(row, lambda: self.run_ratio(row))()
        result["command"] = command(row, self.results)
        self.results[row] = result
        self.save()
        print(json.dumps({k: v for k, v in result.items() if k not in ("points", "candidates", "grid")}), flush=True)


def markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def tables(results: dict) -> str:
    dense = results.get("dense")
    rows = []
    for row in ROWS:
        if row in results and ":" in row:
            r = results[row]
            method, allocation = row.split(":")
            low, high = r["allocation_range"]
            seconds = f"{r['seconds']:.0f}"
            if allocation != "uniform":
                seconds += " (reused)" if r["statistics_reused"] else f" ({r['allocation_seconds']:.0f})"
            rows.append([method, allocation, f"{r['perplexity']:.2f}", f"{r['achieved_sparsity']:.4f}",
                         f"{low:.3f}-{high:.3f}", seconds, f"`{r['command']}`"])
    head = ["method", "allocation", "perplexity at 70 %", "sparsity reached", "layer range",
            "seconds (allocation pass)", "command"]
    lines = [f"Dense perplexity: {dense:.3f}." if dense else "", "", *markdown(head, rows)]
    if "owl-grid" in results:
        g = results["owl-grid"]
        lams = sorted({c["lam"] for c in g["grid"] if c["m"] != "uniform"})
        uniform = next(c["perplexity"] for c in g["grid"] if c["m"] == "uniform")
        lines += ["", f"OWL grid (Wanda from dense statistics, perplexity on {HELD_OUT} held-out calibration "
                      f"windows; uniform: {uniform:.2f}; chose M {g['best']['m']:g}, lambda {g['best']['lam']:g}):", ""]
        lines += markdown(["M (rows) / lambda (columns)", *(f"{lam:g}" for lam in lams)],
                          [[f"{m:g}", *(f"{c['perplexity']:.2f}" for lam in lams for c in g["grid"]
                                        if c["m"] == m and c["lam"] == lam)]
                           for m in dict.fromkeys(c["m"] for c in g["grid"] if c["m"] != "uniform")])
    if "search" in results:
        s = results["search"]
        lines += ["", f"`{s['command']}`: chose sparsity {s['chosen']:.2f}, perplexity {s['perplexity']:.3f} "
                      f"({100 * s['increase']:+.2f} %), {s['seconds']:.0f} s in all.", ""]
        lines += markdown(["candidate", "stage", "sparsity", "perplexity", "increase", "within 10 %", "seconds"],
                          [[str(i), c["stage"], f"{c['sparsity']:.2f}", f"{c['perplexity']:.3f}",
                            f"{100 * c['increase']:+.2f} %", "yes" if c["accepted"] else "no", f"{c['seconds']:.0f}"]
                           for i, c in enumerate(s["candidates"], 1)])
    if "sweep" in results:
        w = results["sweep"]
        lines += ["", f"Exhaustive sweep (`{w['command']}` for S = {w.get('start', 0.5):.2f}, {w.get('start', 0.5) - 0.02:.2f}, ...): best sparsity within "
                      f"+10 %: {w['best']:.2f}; {w['seconds']:.0f} s in all.", ""]
        lines += markdown(["sparsity", *(f"{p['sparsity']:.2f}" for p in w["points"])],
                          [["perplexity", *(f"{p['perplexity']:.2f}" for p in w["points"])],
                           ["increase", *(f"{100 * p['increase']:+.1f} %" for p in w["points"])]])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated rows among {', '.join(ROWS)}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sparsellm-bench-allocation"))
    parser.add_argument("--results", type=Path, default=HERE / "results" / "allocation.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep-start", type=float, default=0.5,
                        help="sparsity the sweep starts from (it must miss the limit; default 0.5)")
    parser.add_argument("--table", action="store_true", help="only print the tables from --results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench(args.workdir, args.results, args.sweep_start)
    if not args.table:
        for row in args.only.split(",") if args.only else ROWS:
            bench.run(row)
    print(tables(bench.results))


if __name__ == "__main__":
    main()
