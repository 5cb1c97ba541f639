"""How much to prune where: the interface every allocation strategy implements, and the exact budget.

A strategy turns a global target (say 70 %) into a sparsity per layer. It works in two phases,
like a pruning method:

1. ``observe`` (optional): called once per decoder block during one calibration pass over the
   *dense* model (``dense_pass``), with the input statistics the strategy ``needs`` for the
   block's layers. OWL counts outliers here; the sensitivity strategy measures the loss.
2. ``solve(slots, target)``: the sparsity each layer should get, as real numbers. Cheap, so a
   search over targets re-solves from the same statistics without another calibration pass.

``realize`` then turns those real numbers into whole weights: the number of pruned weights over
all layers equals round(target x parameters) exactly (each layer within one weight of its share)
for unstructured patterns, and for N:M patterns a whole N per group of layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ... import engine
from ...errors import SparseLLMError
from ...models import decoder_blocks, in_features, linear_layers
from ..base import InputStatistics
from ..masks import Pattern, apportion

MAX_SPARSITY = 0.999  # a layer keeps at least one weight in a thousand


@dataclass(frozen=True)
class LayerSlot:
    """One prunable linear layer: its dotted name, the block it belongs to, and its (out, in) shape."""

    name: str
    block: str
    rows: int
    columns: int

    @property
    def numel(self) -> int:
        return self.rows * self.columns


def layer_slots(model: nn.Module, ignore: Sequence[str] = ()) -> list[LayerSlot]:
    """Every linear layer inside the decoder blocks, in order, except those matching an ``ignore`` regex."""
    ignored = [re.compile(expr) for expr in ignore]
    prefix, blocks = decoder_blocks(model)
    slots = []
    for index, block in enumerate(blocks):
        for name, module in linear_layers(block, f"{prefix}.{index}").items():
            if any(expr.search(name) for expr in ignored):
                continue
            columns = in_features(module)
            slots.append(LayerSlot(name, f"{prefix}.{index}", module.weight.numel() // columns, columns))
    return slots


@dataclass
class BlockInputs:
    """The first calibration windows and what a block of the dense model receives for them."""

    input_ids: torch.Tensor
    hidden: torch.Tensor


@dataclass
class Plan:
    """Per-layer sparsity (0: left dense) and, for N:M, per-layer pattern, chosen by a strategy."""

    layer_sparsity: dict[str, float]
    layer_patterns: dict[str, Pattern] = field(default_factory=dict)

    def pruned_weights(self, slots: Sequence[LayerSlot]) -> int:
        return sum(round(self.layer_sparsity.get(s.name, 0.0) * s.numel) for s in slots)


@dataclass
class Allocation:
    """Base class: subclasses set ``name`` (and ``needs`` when they read calibration statistics)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # input statistics observe() reads (NORMS, HESSIAN)
    exact_budget: ClassVar[bool] = True  # False: the strategy's ratios are final (uniform, a user's table)
    needs_target: ClassVar[bool] = True  # False: it can run without a global sparsity (a user's table)

    @property
    def input_windows(self) -> int:
        """How many calibration windows of each block's (dense) input observe() wants to see."""
        return 0

    @property
    def needs_pass(self) -> bool:
        """Whether the dense calibration pass is still to run: the strategy reads data and has measured
        nothing yet (once it has, it solves any target from what it measured)."""
        return (bool(self.needs) or self.input_windows > 0) and not self.statistics()

    def prepare(self, targets: Sequence[float]) -> None:
        """Told before the calibration pass which targets solve() will be asked for (default: nothing)."""

    def observe(self, step: engine.BlockStep, stats: Mapping[str, InputStatistics],
                slots: Sequence[LayerSlot], inputs: BlockInputs | None) -> None:
        """Look at one block of the dense model during the calibration pass (default: nothing)."""

    def solve(self, slots: Sequence[LayerSlot], target: float | None) -> dict[str, float]:
        """The sparsity each layer should get (real numbers averaging ``target`` where there is one)."""
        raise NotImplementedError

    def groups(self, slots: Sequence[LayerSlot]) -> dict[str, str]:
        """Which layers share one N under an N:M pattern (default: the layers of a block)."""
        return {s.name: s.block for s in slots}

    def statistics(self) -> dict:
        """What the strategy measured (empty before its pass), for sparsity.json and the report."""
        return {}

    def options(self) -> dict:
        return asdict(self)


ALLOCATIONS: dict[str, type[Allocation]] = {}


def register(cls: type[Allocation]) -> type[Allocation]:
    ALLOCATIONS[cls.name] = cls
    return cls


def get_allocation(name: str, **options) -> Allocation:
    """Instantiate a registered strategy with its options (unknown options are an error)."""
    if name not in ALLOCATIONS:
        raise SparseLLMError(f"unknown allocation '{name}': choose one of {', '.join(sorted(ALLOCATIONS))}")
    try:
        return ALLOCATIONS[name](**options)
    except TypeError as exc:
        raise SparseLLMError(f"bad option for allocation {name}: {exc}") from exc


def rebalance(desired: Sequence[float], sizes: Sequence[int], target: float, low: float = 0.0,
              high: float = MAX_SPARSITY) -> list[float]:
    """Clip to [low, high] and shift all ratios by one constant so the size-weighted mean is ``target``.

    Ratios that already average to the target (OWL over equal blocks) come back unchanged.
    """
    total = sum(sizes)
    if not low * total - 1e-9 <= target * total <= high * total + 1e-9:
        raise SparseLLMError(f"target sparsity {target:g} is outside what the allocation allows [{low:g}, {high:g}]")

    def shifted(delta: float) -> list[float]:
        return [min(max(d + delta, low), high) for d in desired]

    def excess(delta: float) -> float:
        return sum(s * n for s, n in zip(shifted(delta), sizes, strict=True)) - target * total

    if abs(excess(0.0)) <= 1e-9 * total:
        return shifted(0.0)
    below, above = -1.0 - max(desired, default=0.0), 1.0 - min(desired, default=0.0)
    for _ in range(200):  # the excess is monotone in the shift
        middle = (below + above) / 2
        if excess(middle) < 0:
            below = middle
        else:
            above = middle
    return shifted((below + above) / 2)


def realize(desired: Mapping[str, float], slots: Sequence[LayerSlot], target: float | None,
            pattern: Pattern, groups: Mapping[str, str] | None = None) -> Plan:
    """Turn real-valued per-layer ratios into whole pruned weights (unstructured) or a whole N (N:M).

    Without a ``target`` the ratios are final: each layer prunes round(ratio x weights), or for N:M
    round(ratio x M) of every M. With a ``target``, the budget is exact. Unstructured: the ratios are
    rebalanced to average the target by parameter count, then apportioned so that exactly
    round(target x parameters) weights are pruned in all, each layer within one weight of its
    share. N:M: layers of one group (``groups`` maps a layer to its group; by default its block)
    share one N, chosen by largest remainders around the group's ratio x M so that the mean N is
    the pattern's N (exact when the groups are equally large). A group whose N reaches M stays dense.
    """
    slots = [s for s in slots if s.name in desired]
    if target is None:
        if not pattern.is_nm:
            return Plan({s.name: desired[s.name] for s in slots})
        plan = Plan({})
        for slot in slots:
            pruned = min(round(desired[slot.name] * pattern.m), pattern.m - 1)
            plan.layer_sparsity[slot.name] = pruned / pattern.m
            if pruned > 0:
                plan.layer_patterns[slot.name] = Pattern(pattern.m - pruned, pattern.m)
        return plan
    if not slots:
        return Plan({})
    if pattern.is_nm:
        return _realize_nm(desired, slots, target, pattern, groups)
    sizes = [s.numel for s in slots]
    ratios = rebalance([desired[s.name] for s in slots], sizes, target)
    counts = apportion([r * n for r, n in zip(ratios, sizes, strict=True)], [1] * len(slots),
                       [n - 1 for n in sizes], round(target * sum(sizes)))
    return Plan({s.name: c / s.numel for s, c in zip(slots, counts, strict=True)})


def _realize_nm(desired: Mapping[str, float], slots: Sequence[LayerSlot], target: float,
                pattern: Pattern, groups: Mapping[str, str] | None) -> Plan:
    group_of = {s.name: (groups or {}).get(s.name, s.block) for s in slots}
    names = list(dict.fromkeys(group_of.values()))
    members = {g: [s for s in slots if group_of[s.name] == g] for g in names}
    sizes = [sum(s.numel for s in members[g]) for g in names]
    ratios = [sum(desired[s.name] * s.numel for s in members[g]) / size for g, size in zip(names, sizes, strict=True)]
    m = pattern.m
    ratios = rebalance(ratios, sizes, target, high=(m - 1) / m)
    total = round(target * sum(sizes))
    # a unit is one more pruned weight in every group of M inputs: size / M weights of the group
    pruned_per_m = apportion([r * m for r in ratios], [n // m for n in sizes], [m - 1] * len(names), total)
    plan = Plan({})
    for group, pruned in zip(names, pruned_per_m, strict=True):
        for slot in members[group]:
            plan.layer_sparsity[slot.name] = pruned / m
            if pruned > 0:
                plan.layer_patterns[slot.name] = Pattern(m - pruned, m)
    return plan


def dense_pass(model: nn.Module, windows: torch.Tensor, slots: Sequence[LayerSlot], needs: frozenset[str],
               observe: Callable | None = None, input_windows: int = 0, keep: bool = False,
               batch_size: int = 8, device: str | torch.device | None = None) -> dict[str, InputStatistics]:
    """One calibration pass over the dense model, block by block (outputs propagate unpruned).

    For each block, gathers the statistics ``needs`` for the layers in ``slots`` and calls
    ``observe(step, stats, slots_of_block, inputs)``, where ``inputs`` holds the block's inputs for
    the first ``input_windows`` windows. Returns the statistics of every layer when ``keep`` is set
    (so a search can prune again and again without another pass), else an empty dict.
    """
    kept: dict[str, InputStatistics] = {}
    by_block: dict[str, list[LayerSlot]] = {}
    for slot in slots:
        by_block.setdefault(slot.block, []).append(slot)
    for step in engine.walk(model, windows, batch_size=batch_size, device=device, desc="dense statistics"):
        block_slots = by_block.get(step.name, [])
        inputs = None
        if input_windows:
            inputs = BlockInputs(windows[:input_windows], first_windows(step.activations.hidden, input_windows))
        layers = step.layers
        wanted = {s.name: layers[s.name] for s in block_slots}
        stats = step.collect(lambda name, module: InputStatistics(in_features(module), needs), wanted,
                             propagate=True) if wanted else {}
        if observe is not None and block_slots:
            observe(step, stats, block_slots, inputs)
        if keep:
            kept.update(stats)
    return kept


def first_windows(batches: Sequence[torch.Tensor], count: int) -> torch.Tensor:
    """The first ``count`` windows of a list of batches, as one tensor (a copy)."""
    taken, have = [], 0
    for batch in batches:
        if have >= count:
            break
        taken.append(batch[: count - have])
        have += taken[-1].shape[0]
    return torch.cat(taken).clone()


def block_ratios_to_layers(block_sparsity: Mapping[str, float], slots: Sequence[LayerSlot]) -> dict[str, float]:
    """Every layer gets its block's sparsity."""
    return {s.name: block_sparsity[s.block] for s in slots if s.block in block_sparsity}
