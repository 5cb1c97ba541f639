"""Masks that change while a model trains, kept exact around every optimizer step.

A ``Sparsifier`` owns one keep-mask per prunable linear layer of the decoder blocks (the layers
one-shot pruning prunes) and a ``MaskSchedule`` that decides when the masks change and to what
(``gmp``, ``rigl``, ``finetune``: one module each). A custom loop replaces ``optimizer.step()``
with ``sparsifier.step()``; loops that clip gradients call ``before_optimizer_step()``, clip,
step, then ``after_optimizer_step()``.

Pruned weights stay exactly zero: gradients are masked before the step, so Adam's moments of a
pruned weight only ever see zeros; when the masks change, the optimizer state of every weight that
leaves the mask is zeroed, so AdamW (update m/(sqrt(v)+eps) = 0, decoupled decay of a zero = 0)
cannot move it and a weight that RigL regrows later starts from zero with fresh moments; the
weights are masked again after the step, for optimizers that move weights without a gradient.

Under DistributedDataParallel every rank computes the masks from identical inputs (weights that
stay in sync, gradients that were all-reduced); a digest of the masks is compared across ranks at
every update, and a difference is an error rather than a silent divergence.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import SparseLLMError
from ..models import decoder_blocks, linear_layers
from ..weights.masks import Pattern, check_sparsity

DISTRIBUTIONS = ("uniform", "erk")


def prunable_layers(model: nn.Module, ignore: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The linear layers of the decoder blocks by full dotted name (as one-shot pruning names them)."""
    model = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    path, blocks = decoder_blocks(model)
    ignored = [re.compile(expr) for expr in ignore]
    layers = {}
    for index, block in enumerate(blocks):
        for name, module in linear_layers(block, f"{path}.{index}").items():
            if not any(expr.search(name) for expr in ignored):
                layers[name] = module
    return layers


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def as_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor (weight, gradient) viewed as (out, in), and an (out, in) mask viewed in the
    weight's layout: GPT-2's Conv1D stores (in, out), and transposing is its own inverse."""
    return tensor.t() if _is_conv1d(module) else tensor


def erk_sparsities(shapes: Mapping[str, tuple[int, int]], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi allocation (RigL's ERK for linear layers): density proportional to (rows + cols) / (rows * cols).

    The scale is solved so that the kept weights total (1 - sparsity) of all weights; a layer whose
    density would exceed 1 is kept dense and the scale solved again over the others.
    """
    total = sum(rows * cols for rows, cols in shapes.values())
    dense: set[str] = set()
    while True:
        budget = (1.0 - sparsity) * total - sum(shapes[name][0] * shapes[name][1] for name in dense)
        rest = [name for name in shapes if name not in dense]
        if not rest:
            break
        scale = budget / sum(shapes[name][0] + shapes[name][1] for name in rest)
        raw = {name: (shapes[name][0] + shapes[name][1]) / (shapes[name][0] * shapes[name][1]) for name in rest}
        over = [name for name in rest if raw[name] * scale > 1.0]
        if not over:
            return {name: 0.0 if name in dense else 1.0 - raw[name] * scale for name in shapes}
        dense.add(max(over, key=raw.__getitem__))
    return dict.fromkeys(shapes, 0.0)


def layer_sparsities(shapes: Mapping[str, tuple[int, int]], sparsity: float, pattern: Pattern,
                     distribution: str = "uniform") -> dict[str, float]:
    """Final sparsity of each layer: the pattern's, the same everywhere, or ERK."""
    if distribution not in DISTRIBUTIONS:
        raise SparseLLMError(f"unknown sparsity distribution '{distribution}': use {' or '.join(DISTRIBUTIONS)}")
    if pattern.is_nm:
        if distribution != "uniform":
            raise SparseLLMError(f"pattern {pattern} fixes every layer's sparsity; use --distribution uniform")
        return dict.fromkeys(shapes, pattern.sparsity)
    if distribution == "erk":
        return erk_sparsities(shapes, sparsity)
    return dict.fromkeys(shapes, sparsity)


@dataclass
class MaskSchedule:
    """When the masks change and what they become; one subclass per method, registered by name.

    Masks and weights handed to a schedule are (out, in) matrices keyed by layer name; ``targets``
    holds each layer's final sparsity. Steps count optimizer steps from 0.
    """

    name: ClassVar[str] = ""
    needs_gradients: ClassVar[bool] = False  # RigL ranks regrowth by the dense gradient

    sparsity: float
    pattern: Pattern
    distribution: str = "uniform"

    def __post_init__(self) -> None:
        self.pattern = Pattern.parse(self.pattern)
        if self.pattern.is_nm:
            self.sparsity = self.pattern.sparsity
        check_sparsity(self.sparsity)

    @classmethod
    def for_steps(cls, steps: int, sparsity: float, pattern: Pattern | str, **options) -> MaskSchedule:
        """The schedule with its step-dependent defaults filled in for a run of ``steps`` steps."""
        return cls(sparsity=sparsity, pattern=pattern, **options)

    def initial_masks(self, weights: Mapping[str, torch.Tensor], targets: Mapping[str, float]) -> dict:
        raise NotImplementedError

    def is_update_step(self, step: int) -> bool:
        return False

    def update(self, step: int, weights: Mapping[str, torch.Tensor], gradients: Mapping[str, torch.Tensor] | None,
               masks: Mapping[str, torch.Tensor], targets: Mapping[str, float]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.name} | {key: str(value) if isinstance(value, Pattern) else value
                                        for key, value in vars(self).items()}


SCHEDULES: dict[str, type[MaskSchedule]] = {}


def register(cls: type[MaskSchedule]) -> type[MaskSchedule]:
    SCHEDULES[cls.name] = cls
    return cls


def make_schedule(method: str, steps: int, sparsity: float | None, pattern: Pattern | str = "unstructured",
                  **options) -> MaskSchedule:
    """A registered schedule for a run of ``steps`` optimizer steps; options left None take its defaults."""
    if method not in SCHEDULES:
        raise SparseLLMError(f"unknown training method '{method}': choose one of {', '.join(sorted(SCHEDULES))}")
    pattern = Pattern.parse(pattern)
    if sparsity is None:
        if not pattern.is_nm and method != "finetune":
            raise SparseLLMError(f"method {method} needs a target sparsity (or an N:M pattern)")
        sparsity = pattern.sparsity if pattern.is_nm else 0.0
    elif pattern.is_nm and abs(sparsity - pattern.sparsity) > 1e-9:
        raise SparseLLMError(f"pattern {pattern} implies sparsity {pattern.sparsity:g}, not {sparsity:g}")
    options = {key: value for key, value in options.items() if value is not None}
    try:
        return SCHEDULES[method].for_steps(steps, sparsity, pattern, **options)
    except TypeError as exc:
        raise SparseLLMError(f"bad option for method {method}: {exc}") from exc


class Sparsifier:
    """Owns the masks of a model's prunable layers and keeps pruned weights exactly zero while it trains."""

    def __init__(self, model: nn.Module, schedule: MaskSchedule, optimizer: torch.optim.Optimizer | None = None,
                 *, ignore: Sequence[str] = (), step: int = 0,
                 masks: Mapping[str, torch.Tensor] | None = None) -> None:
        self.layers = prunable_layers(model, ignore)
        if not self.layers:
            raise SparseLLMError("the model has no prunable linear layers in its decoder blocks")
        if any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()) or any(
                type(module.weight).__name__ == "DTensor" for module in self.layers.values()):
            raise SparseLLMError("FSDP-sharded weights are not supported: masks are computed on whole matrices; "
                                 "use DistributedDataParallel (torchrun, accelerate launch --multi_gpu)")
        self.schedule = schedule
        self.optimizer = optimizer
        self.step_count = step
        for name, module in self.layers.items():
            schedule.pattern.check_width(as_matrix(module, module.weight).shape[1], name)
        shapes = {name: tuple(as_matrix(module, module.weight).shape) for name, module in self.layers.items()}
        self.targets = layer_sparsities(shapes, schedule.sparsity, schedule.pattern, schedule.distribution)
        if masks is None:
            masks = schedule.initial_masks(self._weights(), self.targets)
        missing = set(self.layers) - set(masks)
        if missing:
            raise SparseLLMError(f"no mask given for layer {sorted(missing)[0]}")
        self.masks = {name: masks[name].to(module.weight.device, torch.bool) for name, module in self.layers.items()}
        self.updates: list[dict] = []  # one record per mask update: step, sparsity, changed, digest
        self._apply_masks()
        self._sparsity = self._count_sparsity()

    def _weights(self) -> dict[str, torch.Tensor]:
        return {name: as_matrix(module, module.weight.detach()) for name, module in self.layers.items()}

    def _gradients(self) -> dict[str, torch.Tensor]:
        gradients = {}
        for name, module in self.layers.items():
            if module.weight.grad is None:
                raise SparseLLMError(f"{self.schedule.name} needs gradients, and layer {name} has none at this step")
            gradients[name] = as_matrix(module, module.weight.grad)
        return gradients

    @torch.no_grad()
    def _apply_masks(self) -> None:
        """Zero the pruned weights and their optimizer state (moments of an entry outside the mask)."""
        # Masks as 0/1 in the weight's dtype and layout: multiplying by them is the cheapest masking
        # pass (a bool operand would be converted on every call).
        self._multipliers = {name: as_matrix(module, self.masks[name]).to(module.weight.dtype)
                             for name, module in self.layers.items()}
        state = self.optimizer.state if self.optimizer is not None else {}
        for name, module in self.layers.items():
            keep = self._multipliers[name]
            module.weight.mul_(keep)
            for value in state.get(module.weight, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == module.weight.shape:
                    value.mul_(keep)

    @torch.no_grad()
    def update_masks(self) -> None:
        """Let the schedule recompute the masks now (it is called at the schedule's update steps)."""
        gradients = self._gradients() if self.schedule.needs_gradients else None
        new = self.schedule.update(self.step_count, self._weights(), gradients, self.masks, self.targets)
        changed = sum(int((new[name] != self.masks[name]).sum()) for name in self.masks)
        self.masks = {name: new[name].to(torch.bool) for name in self.masks}
        self._apply_masks()
        self._sparsity = self._count_sparsity()
        digests = _same_on_every_rank(self.digest(), self.step_count)
        self.updates.append({"step": self.step_count, "sparsity": self.sparsity(), "changed": changed,
                             "digest": digests[0], "ranks": len(digests)})

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for name, module in self.layers.items():
            if module.weight.grad is not None:
                module.weight.grad.mul_(self._multipliers[name])

    @torch.no_grad()
    def mask_weights(self) -> None:
        for name, module in self.layers.items():
            module.weight.mul_(self._multipliers[name])

    def before_optimizer_step(self) -> None:
        """Update the masks if the schedule says so (with the dense gradient), then mask the gradients."""
        if self.schedule.is_update_step(self.step_count):
            self.update_masks()
        self.mask_gradients()

    def after_optimizer_step(self) -> None:
        self.mask_weights()
        self.step_count += 1

    def step(self) -> None:
        """Replaces ``optimizer.step()`` in a custom loop."""
        if self.optimizer is None:
            raise SparseLLMError("Sparsifier.step() needs the optimizer: Sparsifier(model, schedule, optimizer)")
        self.before_optimizer_step()
        self.optimizer.step()
        self.after_optimizer_step()

    def sparsity(self) -> float:
        """Fraction of pruned weights over all masked layers."""
        return self._sparsity

    def _count_sparsity(self) -> float:
        total = sum(mask.numel() for mask in self.masks.values())
        return sum(int((~mask).sum()) for mask in self.masks.values()) / total

    def layer_report(self) -> list[dict]:
        return [{"name": name, "shape": list(mask.shape), "target": self.targets[name],
                 "sparsity": 1.0 - mask.float().mean().item()} for name, mask in self.masks.items()]

    def digest(self) -> str:
        """A fingerprint of all masks, to compare ranks and runs."""
        hasher = hashlib.sha256()
        for name in sorted(self.masks):
            hasher.update(name.encode())
            hasher.update(self.masks[name].cpu().contiguous().numpy().tobytes())
        return hasher.hexdigest()[:16]


def _same_on_every_rank(digest: str, step: int) -> list[str]:
    """Every rank's mask digest (this one's alone without a process group); different digests are an error."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [digest]
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise SparseLLMError(f"the masks differ across ranks after the update at step {step}: {digests}")
    return digests
