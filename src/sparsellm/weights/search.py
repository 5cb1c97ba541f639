"""Targets instead of ratios: the sparsest model whose held-out perplexity rises at most a given share.

1. Measure the dense perplexity, and run *one* calibration pass over the dense model that gathers
   every statistic the method and the allocation need (``allocation.dense_pass``).
2. Bisect the target sparsity on a grid of ``step``: each candidate is pruned from those dense
   statistics (no calibration pass; Wanda only recomputes masks, SparseGPT only re-solves), scored
   on the evaluation text, and the dense weights are put back. The allocation re-solves each
   target from what it measured once.
3. Prune the chosen target with the full method (statistics of the pruned model, block after
   block, as ``prune`` does) and score it; should it miss the limit, step down one grid point.

Perplexity grows with sparsity, which the bisection assumes. Every candidate is reported.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..data import Text
from ..errors import SparseLLMError
from ..evaluation import perplexity
from ..logging_utils import logger
from ..models import decoder_blocks, linear_layers, set_weight_matrix, weight_matrix
from .allocation import Allocation, dense_pass, get_allocation, layer_slots
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


def _linear_modules(model) -> dict:
    prefix, blocks = decoder_blocks(model)
    return {name: module for index, block in enumerate(blocks)
            for name, module in linear_layers(block, f"{prefix}.{index}").items()}


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
    if Pattern.parse(pattern).is_nm:
        raise SparseLLMError("the perplexity target searches unstructured sparsity; N:M fixes it")
    if not 0 < step < 1 or not 0 <= low < high < 1:
        raise SparseLLMError(f"bad search grid: step {step:g} over [{low:g}, {high:g}]")
    strategy = allocation if isinstance(allocation, Allocation) else get_allocation(allocation)
    algorithm = get_method(method, **method_options)
    grid = [round(low + i * step, 10) for i in range(int((high - low) / step + 1e-9) + 1)]
    evaluate = {"data": eval_data, "seqlen": eval_seqlen, "max_windows": eval_windows, "batch_size": eval_batch_size}
    dense_evaluation = perplexity(model, tokenizer, **evaluate)
    dense = dense_evaluation.perplexity
    result = SearchResult(max_increase, dense, step)
    limit = dense * (1 + max_increase)
    logger.info("search: dense perplexity %.3f, limit %.3f (+%.1f %%)", dense, limit, 100 * max_increase)

    slots = layer_slots(model, ignore)
    windows, _ = calibration_windows(model, tokenizer, calib, nsamples, seqlen, seed, sampling)
    strategy.prepare(grid[:: max(1, round(0.2 / step))])
    needs = algorithm.needs | strategy.needs | ({HESSIAN} if quantization is not None else set())
    statistics = dense_pass(model, windows, slots, needs,
                            strategy.observe if strategy.needs_pass else None, strategy.input_windows,
                            keep=True, batch_size=batch_size, device=device)
    modules = _linear_modules(model)
    dense_weights = {s.name: weight_matrix(modules[s.name]) for s in slots}

    def restore() -> None:
        for name, weight in dense_weights.items():
            set_weight_matrix(modules[name], weight)

    def attempt(index: int, stage: str) -> bool:
        started = time.perf_counter()
        restore()
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
        restore()
        result.report, result.evaluation = None, dense_evaluation.to_dict()
    result.chosen = grid[chosen]
    return result
