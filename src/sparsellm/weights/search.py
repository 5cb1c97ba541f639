"""Targets instead of ratios: the sparsest model whose perplexity rises at most a given share
(``sparsest_within``), or the least sparse one whose compact folder fits in a size (``least_within_size``).

Perplexity target:

1. Measure the dense perplexity, and run *one* calibration pass over the dense model that gathers
   every statistic the method and the allocation need (``allocation.dense_pass``).
2. Bisect the target sparsity on a grid of ``step``: each candidate is pruned from those dense
   statistics (no calibration pass; Wanda only recomputes masks, SparseGPT only re-solves), scored
   on the evaluation text, and the dense weights are put back. The allocation re-solves each
   target from what it measured once.
3. Prune the chosen target with the full method (statistics of the pruned model, block after
   block, as ``prune`` does) and score it; should it miss the limit, step down one grid point.

Perplexity grows with sparsity, which the bisection assumes. Every candidate is reported.

Size target: the bytes of a compact folder follow from each layer's count of kept weights, which
the allocation's plan fixes before any pruning (``format.compact.planned_bytes``). The smallest
grid point whose planned bytes, plus what the other files take, fit is pruned and saved, and the
folder's real bytes are measured; should it not fit, the overhead just measured is used to pick
the next point up.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data import Text
from ..errors import SparseLLMError
from ..evaluation import perplexity
from ..logging_utils import logger
from ..models import decoder_blocks, linear_layers, set_weight_matrix, weight_matrix
from .allocation import Allocation, dense_pass, get_allocation, layer_slots, realize
from .base import HESSIAN, get_method
from .masks import Pattern
from .oneshot import PruneReport, calibration_windows, prune
from .quant import QuantScheme


@dataclass
class Candidate:
    sparsity: float  # the target tried
    achieved_sparsity: float
    perplexity: float
    increase: float  # relative to the dense perplexity
    accepted: bool
    stage: str  # "search" (pruned from dense statistics) or "final" (the full method)
    seconds: float


@dataclass
class SearchResult:
    max_increase: float
    dense_perplexity: float
    step: float
    candidates: list[Candidate] = field(default_factory=list)
    chosen: float | None = None
    report: PruneReport | None = None  # of the model left in place (None: it stayed dense)
    evaluation: dict | None = None  # the perplexity of the model left in place

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["report"], data["evaluation"]
        return data


def parse_share(text: str | float) -> float:
    """'5%' or '0.05' -> 0.05."""
    value = str(text).strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError as exc:
        raise SparseLLMError(f"cannot read {text!r} as a share: use 5% or 0.05") from exc
    if not 0 < share < 10:
        raise SparseLLMError(f"the allowed increase must be positive, got {text!r}")
    return share


SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """'60MB' -> 60_000_000 bytes (KB, MB, GB are powers of 1000; KiB, MiB, GiB of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match[2].lower() not in SIZE_UNITS or float(match[1]) <= 0:
        raise SparseLLMError(f"cannot read {text!r} as a size: use e.g. 60MB, 1.5GB or 500MiB")
    return round(float(match[1]) * SIZE_UNITS[match[2].lower()])


def _grid(what: str, pattern: str | Pattern, step: float, low: float, high: float) -> list[float]:
    if Pattern.parse(pattern).is_nm:
        raise SparseLLMError(f"the {what} searches unstructured sparsity; N:M fixes it")
    if not 0 < step < 1 or not 0 <= low < high < 1:
        raise SparseLLMError(f"bad search grid: step {step:g} over [{low:g}, {high:g}]")
    return [round(low + i * step, 10) for i in range(int((high - low) / step + 1e-9) + 1)]


def _probe_levels(grid: Sequence[float], step: float) -> list[float]:
    """Targets to tell an allocation before its pass: every 0.2 of the grid."""
    return list(grid[:: max(1, round(0.2 / step))])


class DenseCopy:
    """The dense weights of the layers a search prunes again and again, put back between candidates."""

    def __init__(self, model, slots: Sequence) -> None:
        prefix, blocks = decoder_blocks(model)
        self.modules = {name: module for index, block in enumerate(blocks)
                        for name, module in linear_layers(block, f"{prefix}.{index}").items()}
        self.weights = {slot.name: weight_matrix(self.modules[slot.name]) for slot in slots}

    def restore(self) -> None:
        for name, weight in self.weights.items():
            set_weight_matrix(self.modules[name], weight)


def sparsest_within(model, tokenizer, max_increase: float, *, method: str = "sparsegpt",
                    pattern: str | Pattern = "unstructured", allocation: str | Allocation = "uniform",
                    step: float = 0.01, low: float = 0.0, high: float = 0.95, calib: str | Text = "builtin",
                    nsamples: int = 64, seqlen: int = 512, seed: int = 0, sampling: str = "consecutive",
                    ignore: Sequence[str] = (), eval_data: str | Text = "builtin", eval_seqlen: int = 512,
                    eval_windows: int | None = 32, eval_batch_size: int = 4, device: str | None = None,
                    batch_size: int = 8, quantization: QuantScheme | None = None,
                    **method_options) -> SearchResult:
    """Prune ``model`` in place to the sparsest grid point whose perplexity is at most
    (1 + ``max_increase``) x dense; returns every candidate and the final prune's report."""
    grid = _grid("perplexity target", pattern, step, low, high)
    strategy = allocation if isinstance(allocation, Allocation) else get_allocation(allocation)
    algorithm = get_method(method, **method_options)
    evaluate = {"data": eval_data, "seqlen": eval_seqlen, "max_windows": eval_windows, "batch_size": eval_batch_size}
    dense_evaluation = perplexity(model, tokenizer, **evaluate)
    dense = dense_evaluation.perplexity
    result = SearchResult(max_increase, dense, step)
    limit = dense * (1 + max_increase)
    logger.info("search: dense perplexity %.3f, limit %.3f (+%.1f %%)", dense, limit, 100 * max_increase)

    slots = layer_slots(model, ignore)
    windows, _ = calibration_windows(model, tokenizer, calib, nsamples, seqlen, seed, sampling)
    strategy.prepare(_probe_levels(grid, step))
    needs = algorithm.needs | strategy.needs | ({HESSIAN} if quantization is not None else set())
    statistics = dense_pass(model, windows, slots, needs,
                            strategy.observe if strategy.needs_pass else None, strategy.input_windows,
                            keep=True, batch_size=batch_size, device=device)
    dense_weights = DenseCopy(model, slots)

    def attempt(index: int, stage: str) -> bool:
        started = time.perf_counter()
        dense_weights.restore()
        report = prune(model, tokenizer, method=method, sparsity=grid[index], allocation=strategy, calib=calib,
                       nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling, ignore=ignore,
                       statistics=statistics if stage == "search" else None, device=device,
                       batch_size=batch_size, quantization=quantization, **method_options)
        scored = perplexity(model, tokenizer, **evaluate)
        ppl = scored.perplexity
        accepted = ppl <= limit
        result.candidates.append(Candidate(grid[index], report.achieved_sparsity, ppl, ppl / dense - 1, accepted,
                                           stage, time.perf_counter() - started))
        result.report, result.evaluation = report, scored.to_dict()
        logger.info("search %s: sparsity %.3f -> perplexity %.3f (%+.2f %%) %s", stage, grid[index], ppl,
                    100 * (ppl / dense - 1), "ok" if accepted else "over the limit")
        return accepted

    good, bad = 0, len(grid)  # grid[good] passes (the low end is taken to), grid[bad] fails (or is off the grid)
    while bad - good > 1:
        middle = (good + bad) // 2
        if attempt(middle, "search"):
            good = middle
        else:
            bad = middle
    statistics.clear()
    chosen = good
    while chosen > 0 and not attempt(chosen, "final"):
        chosen -= 1
    if chosen == 0 and grid[0] > 0 and not attempt(0, "final"):
        raise SparseLLMError(f"even sparsity {grid[0]:g} raises perplexity by more than {100 * max_increase:g} %")
    if grid[chosen] == 0:
        dense_weights.restore()
        result.report, result.evaluation = None, dense_evaluation.to_dict()
    result.chosen = grid[chosen]
    return result


@dataclass
class SizeCandidate:
    sparsity: float
    planned_bytes: int  # tensor bytes from the plan, plus the other files as last measured
    bytes: int | None  # the folder on disk after saving (None: the save that records it)
    accepted: bool | None
    seconds: float


@dataclass
class SizeResult:
    max_bytes: int
    step: float
    candidates: list[SizeCandidate] = field(default_factory=list)
    chosen: float | None = None
    report: PruneReport | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["report"]
        return data


def _auxiliary_bytes(model, tokenizer) -> int:
    """Bytes of the files besides tensor data that every folder holds (config, tokenizer)."""
    with tempfile.TemporaryDirectory() as folder:
        model.config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def least_within_size(model, tokenizer, max_bytes: int, save: Callable[[PruneReport, SizeResult], Path], *,
                      method: str = "sparsegpt", pattern: str | Pattern = "unstructured",
                      allocation: str | Allocation = "uniform", step: float = 0.01, low: float = 0.0,
                      high: float = 0.99, calib: str | Text = "builtin", nsamples: int = 64, seqlen: int = 512,
                      seed: int = 0, sampling: str = "consecutive", ignore: Sequence[str] = (),
                      dtype: torch.dtype | None = None, quantization: QuantScheme | None = None,
                      device: str | None = None, batch_size: int = 8, **method_options) -> SizeResult:
    """Prune ``model`` to the least sparsity on the grid whose compact folder, written by
    ``save(report, result)`` (which returns the folder), takes at most ``max_bytes``."""
    from ..checkpoint import folder_bytes
    from ..format.compact import planned_bytes

    grid = _grid("size target", pattern, step, low, high)
    strategy = allocation if isinstance(allocation, Allocation) else get_allocation(allocation)
    slots = layer_slots(model, ignore)
    if strategy.needs_pass:
        windows, _ = calibration_windows(model, tokenizer, calib, nsamples, seqlen, seed, sampling)
        strategy.prepare(_probe_levels(grid, step))
        dense_pass(model, windows, slots, strategy.needs, strategy.observe, strategy.input_windows,
                   batch_size=batch_size, device=device)

    def tensor_bytes(target: float) -> int:
        plan = realize(strategy.solve(slots, target), slots, target if strategy.exact_budget else None, Pattern(),
                       strategy.groups(slots))
        numel = {slot.name: slot.numel for slot in slots}
        kept = {name: numel[name] - round(ratio * numel[name]) for name, ratio in plan.layer_sparsity.items()
                if ratio > 0}
        return planned_bytes(model, kept, plan.layer_patterns, dtype, quantization)

    overhead = _auxiliary_bytes(model, tokenizer)
    dense_weights = DenseCopy(model, slots)
    result = SizeResult(max_bytes, step)
    index = 0
    while True:
        fitting = [i for i in range(index, len(grid)) if tensor_bytes(grid[i]) + overhead <= max_bytes]
        if not fitting:
            raise SparseLLMError(f"even sparsity {grid[-1]:g} takes {(tensor_bytes(grid[-1]) + overhead) / 1e6:.1f} MB"
                                 f", more than {max_bytes / 1e6:.1f} MB (quantize with --bits, or save in bfloat16)")
        index = fitting[0]
        started = time.perf_counter()
        dense_weights.restore()
        planned = tensor_bytes(grid[index])
        result.report = prune(model, tokenizer, method=method, sparsity=grid[index], allocation=strategy,
                              calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling,
                              ignore=ignore, device=device, batch_size=batch_size, quantization=quantization,
                              **method_options)
        candidate = SizeCandidate(grid[index], planned + overhead, None, None, 0.0)
        result.candidates.append(candidate)
        result.chosen = grid[index]
        folder = save(result.report, result)
        candidate.bytes = folder_bytes(folder)
        candidate.accepted = candidate.bytes <= max_bytes
        candidate.seconds = time.perf_counter() - started
        logger.info("size search: sparsity %.3f -> %.2f MB on disk (planned %.2f MB) %s", grid[index],
                    candidate.bytes / 1e6, candidate.planned_bytes / 1e6,
                    "ok" if candidate.accepted else "over the limit")
        if candidate.accepted:
            return result
        overhead = candidate.bytes - planned
        index += 1
