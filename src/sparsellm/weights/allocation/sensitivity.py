"""Sensitivity allocation: measure how the calibration loss reacts to pruning each block, then solve.

During the dense calibration pass, each group (a decoder block, or a single linear layer with
``granularity="layer"``) is pruned alone at a few ``levels`` (Wanda scores from the dense
statistics, unstructured, whatever the final method and pattern) and the loss of the whole model
is measured from that block on, over the first ``windows`` calibration windows; then the group is
restored. The loss is the KL divergence from the dense model's next-token distribution (``kl``)
or the increase of the next-token NLL (``nll``).

Each group's loss increase is fitted as L_g(s) = exp(a_g + c_g s) (least squares in log space),
and the ratios minimise the predicted total sum_g L_g(s_g) subject to the parameter budget
sum_g n_g s_g = S * sum_g n_g, with 0 <= s_g <= max(levels). The optimum has equal marginal loss
per pruned weight, c_g L_g(s_g) / n_g = mu, so s_g(mu) has a closed form and mu is found by
bisection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ... import engine
from ...errors import SparseLLMError
from ...logging_utils import logger
from ...models import set_weight_matrix, weight_matrix
from ..base import NORMS, InputStatistics, get_method
from ..masks import Pattern
from .base import Allocation, BlockInputs, LayerSlot, register

LOSSES = ("kl", "nll")
FLOOR = 1e-9  # loss increases below this are treated as this (log space needs positive values)


def levels_around(targets: Sequence[float], spread: float = 0.1) -> list[float]:
    """Default probe levels: each target and +-``spread`` around it, within [0.05, 0.95]."""
    levels = {round(min(max(t + d, 0.05), 0.95), 4) for t in targets for d in (-spread, 0.0, spread)}
    return sorted(levels)


def fit_exponential(levels: Sequence[float], increases: Sequence[float]) -> tuple[float, float]:
    """(a, c) of log(L) = a + c s by least squares; c is kept positive (more pruning never helps)."""
    xs = list(levels)
    ys = [math.log(max(y, FLOOR)) for y in increases]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - x_mean) ** 2 for x in xs)
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0
    slope = max(slope, 1e-3)
    return y_mean - slope * x_mean, slope


def solve_exponential(fits: Sequence[tuple[float, float]], sizes: Sequence[int], target: float,
                      high: float) -> list[float]:
    """Ratios s_g in [0, high] minimising sum exp(a_g + c_g s_g) with sum n_g s_g = target * sum n_g."""
    total = sum(sizes)
    if not 0 <= target <= high:
        raise SparseLLMError(f"sensitivity: target {target:g} is above the highest probed level {high:g}; "
                             "add higher levels")

    def ratios(log_mu: float) -> list[float]:
        return [min(max((log_mu + math.log(n / c) - a) / c, 0.0), high)
                for (a, c), n in zip(fits, sizes, strict=True)]

    def pruned(log_mu: float) -> float:
        return sum(s * n for s, n in zip(ratios(log_mu), sizes, strict=True))

    low_mu, high_mu = -1000.0, 1000.0
    for _ in range(200):  # pruned() increases with mu
        middle = (low_mu + high_mu) / 2
        if pruned(middle) < target * total:
            low_mu = middle
        else:
            high_mu = middle
    return ratios((low_mu + high_mu) / 2)


@register
@dataclass
class Sensitivity(Allocation):
    name = "sensitivity"
    needs = frozenset({NORMS})
    levels: Sequence[float] = ()  # sparsities each group is probed at; default: target and +-0.1
    windows: int = 4  # calibration windows the loss is measured on
    granularity: str = "block"  # "block" or "layer"
    loss: str = "kl"  # "kl" (from the dense model's predictions) or "nll"
    batch_size: int = 2
    # what the pass measured: group -> loss increase per level, group -> its layers, and the dense
    # model's log-probabilities (kl) or summed NLL (nll) per batch of windows
    increases: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)
    members: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)
    reference: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.granularity not in ("block", "layer"):
            raise SparseLLMError(f"sensitivity granularity must be block or layer, not {self.granularity!r}")
        if self.loss not in LOSSES:
            raise SparseLLMError(f"sensitivity loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.windows < 1:
            raise SparseLLMError("sensitivity needs at least one calibration window")
        self.levels = sorted(float(v) for v in self.levels)
        if any(not 0 < v < 1 for v in self.levels):
            raise SparseLLMError(f"sensitivity levels must lie in (0, 1), got {self.levels}")

    @property
    def input_windows(self) -> int:
        return self.windows

    def options(self) -> dict:
        return {"levels": list(self.levels), "windows": self.windows, "granularity": self.granularity,
                "loss": self.loss, "batch_size": self.batch_size}

    def prepare(self, targets: Sequence[float]) -> None:
        if not self.levels:
            self.levels = levels_around([t for t in targets if t is not None])
        if len(self.levels) < 2:
            raise SparseLLMError("sensitivity needs at least two probe levels to fit a curve")

    def _batches(self, inputs: BlockInputs):
        for start in range(0, len(inputs.input_ids), self.batch_size):
            yield inputs.input_ids[start : start + self.batch_size], inputs.hidden[start : start + self.batch_size]

    def _measure(self, model, index: int, inputs: BlockInputs) -> float:
        """Mean per-token loss of the model run from block ``index`` on (KL to dense, or NLL increase)."""
        total, count = 0.0, 0
        for batch, (ids, hidden) in enumerate(self._batches(inputs)):
            logits = engine.logits_from(model, index, hidden, ids)[:, :-1].float()
            log_probs = F.log_softmax(logits, dim=-1).cpu()
            if self.loss == "kl":
                reference = self.reference[batch]
                total += (reference.exp() * (reference - log_probs)).sum().item()
            else:
                total += -log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).sum().item() - self.reference[batch].item()
            count += ids[:, 1:].numel()
        return total / count

    def _remember_dense(self, model, index: int, inputs: BlockInputs) -> None:
        for ids, hidden in self._batches(inputs):
            log_probs = F.log_softmax(engine.logits_from(model, index, hidden, ids)[:, :-1].float(), dim=-1).cpu()
            self.reference.append(log_probs if self.loss == "kl" else
                                   -log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).sum())

    def observe(self, step: engine.BlockStep, stats: Mapping[str, InputStatistics],
                slots: Sequence[LayerSlot], inputs: BlockInputs | None) -> None:
        model = step.model
        if not self.reference:
            self._remember_dense(model, step.index, inputs)
        layers = step.layers
        members: dict[str, list[str]] = {}
        for name, group in self.groups(slots).items():
            members.setdefault(group, []).append(name)
        probe = get_method("wanda")
        for group, names in members.items():
            dense = {name: weight_matrix(layers[name]) for name in names}
            increases = []
            for level in self.levels:
                for name in names:
                    set_weight_matrix(layers[name], probe.prune(dense[name].clone(), stats[name], level, Pattern()))
                increases.append(self._measure(model, step.index, inputs))
            for name in names:
                set_weight_matrix(layers[name], dense[name])
            self.increases[group] = increases
            self.members[group] = names
            logger.debug("sensitivity %s: %s", group, ", ".join(f"{v:.3g}" for v in increases))

    def groups(self, slots: Sequence[LayerSlot]) -> dict[str, str]:
        return {s.name: s.block if self.granularity == "block" else s.name for s in slots}

    def solve(self, slots: Sequence[LayerSlot], target: float | None) -> dict[str, float]:
        if target is None:
            raise SparseLLMError("the sensitivity allocation needs a target sparsity")
        if not self.increases:
            raise SparseLLMError("the sensitivity allocation has not measured anything yet")
        numel = {s.name: s.numel for s in slots}
        measured = [g for g in self.increases if any(n in numel for n in self.members[g])]
        sizes = [sum(numel.get(n, 0) for n in self.members[g]) for g in measured]
        fits = [fit_exponential(self.levels, self.increases[g]) for g in measured]
        ratios = solve_exponential(fits, sizes, target, max(self.levels))
        return {name: ratio for g, ratio in zip(measured, ratios, strict=True) for name in self.members[g]
                if name in numel}

    def statistics(self) -> dict:
        if not self.increases:
            return {}
        groups = list(self.increases)
        return {"granularity": self.granularity, "loss": self.loss, "levels": list(self.levels),
                "groups": groups, "loss_increase": [self.increases[g] for g in groups],
                "fit": [list(fit_exponential(self.levels, self.increases[g])) for g in groups]}
