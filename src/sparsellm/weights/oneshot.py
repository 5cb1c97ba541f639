"""One-shot pruning of a causal LM: ``sparsellm.prune(model, tokenizer, method=..., sparsity=...)``.

Block by block (see ``engine``): gather the statistics the method needs for all linear layers of
the block in one pass over the calibration windows, prune each layer, then re-run the pruned block
so the next block calibrates on what the pruned model really produces. A method whose
``calibration_inputs`` is "dense" (Wanda by default) calibrates every block on the dense model's
activations instead: the statistics pass itself carries them on, and no block is run twice.

With a ``QuantScheme`` the kept weights are also quantized: inside SparseGPT's sweep (joint mode),
or by a masked GPTQ pass right after methods that cannot. Each quantized layer remembers its grid
(``quant.attach_grid``) so a compact save stores integer codes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .. import engine
from ..data import Text, check_context, load_text, token_windows
from ..errors import SparseLLMError
from ..logging_utils import logger
from ..models import in_features, set_weight_matrix, weight_matrix
from .allocation import Allocation, LayerSlot, Plan, dense_pass, get_allocation, layer_slots, realize
from .base import HESSIAN, InputStatistics, get_method
from .gptq import quantize_masked
from .masks import Pattern, check_sparsity
from .quant import LayerQuantizer, QuantScheme, attach_grid


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    target: float
    pattern: str
    sparsity: float  # measured after pruning: zeros / numel
    relative_error: float | None  # ||(W - W')X|| / ||WX|| on the first calibration tokens
    seconds: float


@dataclass
class PruneReport:
    """What a pruning run did: the sparsellm.json written next to a pruned model."""

    method: str
    options: dict
    pattern: str
    sparsity: float | None
    calibration: dict | None
    allocation: dict = field(default_factory=lambda: {"name": "uniform", "options": {}})
    layers: list[LayerResult] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    quantization: dict | None = None  # QuantScheme fields and how it was applied (joint / gptq)

    @property
    def achieved_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["achieved_sparsity"] = self.achieved_sparsity
        return data


def calibration_windows(model, tokenizer, calib: str | Text = "builtin", nsamples: int = 64, seqlen: int = 512,
                        seed: int = 0, sampling: str = "consecutive") -> tuple[torch.Tensor, dict]:
    """Calibration token windows and a description of the exact text used."""
    if nsamples < 1:
        raise SparseLLMError(f"--nsamples must be at least 1, got {nsamples}")
    check_context(model, seqlen)
    text = calib if isinstance(calib, Text) else load_text(calib, "calibration")
    windows = token_windows(tokenizer, text, seqlen, nsamples, sampling=sampling, seed=seed)
    description = text.describe() | {"nsamples": nsamples, "seqlen": seqlen, "sampling": sampling, "seed": seed,
                                     "bos_prepended": bool(windows[0, 0] == tokenizer.bos_token_id
                                                           and tokenizer.bos_token_id is not None)}
    return windows, description


def _check_target(sparsity: float | None, pattern: Pattern, strategy: Allocation) -> float | None:
    if pattern.is_nm:
        if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-9:
            raise SparseLLMError(f"pattern {pattern} implies sparsity {pattern.sparsity:g}, not {sparsity:g}")
        return pattern.sparsity
    if sparsity is None:
        if strategy.needs_target:
            raise SparseLLMError("give a sparsity (or an N:M pattern)")
        return None
    return check_sparsity(sparsity)


def plan_layers(model, strategy: Allocation, slots: Sequence[LayerSlot], sparsity: float | None, pattern: Pattern,
                windows: torch.Tensor | None, batch_size: int = 8,
                device: str | None = None) -> tuple[Plan, float]:
    """Run the strategy's dense calibration pass if it still needs one, then solve and realize its plan.

    Returns the plan and the seconds the pass took (0 when the strategy had measured already).
    """
    started = time.perf_counter()
    if strategy.needs_pass:
        strategy.prepare([sparsity])
        logger.info("%s allocation: dense calibration pass", strategy.name)
        dense_pass(model, windows, slots, strategy.needs, strategy.observe, strategy.input_windows,
                   batch_size=batch_size, device=device)
    seconds = time.perf_counter() - started
    desired = strategy.solve(slots, sparsity)
    plan = realize(desired, slots, sparsity if strategy.exact_budget else None, pattern, strategy.groups(slots))
    for target in plan.layer_sparsity.values():
        check_sparsity(target)
    return plan, seconds


def _cached(statistics: Mapping[str, InputStatistics], name: str, needs: frozenset[str]) -> InputStatistics:
    stats = statistics.get(name)
    if stats is None or not needs <= stats.needs:
        raise SparseLLMError(f"the precomputed statistics lack {', '.join(sorted(needs))} for layer {name}")
    return stats


def _shared_input_groups(names: list[str], stats: dict, patterns: Mapping[str, Pattern]) -> list[list[str]]:
    """Layers that share one statistics object (they read the same input) and one pattern, in module order."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault((id(stats[name]) if name in stats else id(name), patterns.get(name)), []).append(name)
    return list(groups.values())


def relative_error(before: torch.Tensor, after: torch.Tensor, probe: torch.Tensor | None) -> float | None:
    if probe is None or probe.numel() == 0:
        return None
    probe = probe.to(before.device)
    reference = probe @ before.t()
    return ((probe @ (before - after).t()).norm() / reference.norm().clamp_min(1e-12)).item()


def prune(model, tokenizer=None, *, method: str = "sparsegpt", sparsity: float | None = 0.5,
          pattern: str | Pattern = "unstructured", allocation: str | Allocation = "uniform",
          calib: str | Text = "builtin", nsamples: int = 64, seqlen: int = 512, seed: int = 0,
          sampling: str = "consecutive", ignore: Sequence[str] = (),
          layer_sparsity: Mapping[str, float] | None = None,
          statistics: Mapping[str, InputStatistics] | None = None, device: str | None = None,
          batch_size: int = 8, quantization: QuantScheme | None = None, windows: torch.Tensor | None = None,
          **method_options) -> PruneReport:
    """Prune every linear layer inside the decoder blocks of ``model``, in place.

    ``pattern`` is ``"unstructured"`` or ``"N:M"`` (N kept of every M inputs; it implies the
    sparsity, so ``sparsity`` may be None). ``allocation`` chooses each layer's share of the
    target: ``uniform``, ``owl``, ``sensitivity``, ``table`` (see ``weights.allocation``; pass an
    ``Allocation`` object for options; one that has measured already is not run again); with N:M
    it varies N per block. ``ignore`` holds regexes of layer names left dense; ``layer_sparsity``
    overrides the sparsity of the named layers. Methods that need calibration data (Wanda,
    SparseGPT) read ``nsamples`` windows of ``seqlen`` tokens from ``calib``; ``statistics`` (from
    ``allocation.dense_pass(..., keep=True)``) replaces that pass with precomputed statistics of
    the dense model. Embeddings and the LM head are never pruned. ``quantization`` also quantizes
    the kept weights of every pruned layer (jointly inside SparseGPT, else GPTQ on the pruned
    weights; both need calibration data). ``windows`` (count, seqlen) token ids replace the
    windows read from ``calib`` (text a teacher wrote, say).
    """
    started = time.perf_counter()
    pattern = Pattern.parse(pattern)
    strategy = allocation if isinstance(allocation, Allocation) else get_allocation(allocation)
    sparsity = _check_target(sparsity, pattern, strategy)
    algorithm = get_method(method, **method_options)
    if algorithm.calibration_inputs not in ("dense", "pruned"):
        raise SparseLLMError(f"calibration inputs must be dense or pruned, not {algorithm.calibration_inputs!r}")
    slots = layer_slots(model, ignore)
    for slot in slots:
        pattern.check_width(slot.columns, slot.name)
    needs = algorithm.needs | ({HESSIAN} if quantization is not None else set())
    calibrate = bool(needs) and statistics is None
    calibration = None
    if windows is not None:
        calibration = {"name": "given windows", "nsamples": windows.shape[0], "seqlen": windows.shape[1]}
    elif calibrate or strategy.needs_pass:
        if tokenizer is None:
            raise SparseLLMError(f"method {method} with allocation {strategy.name} needs calibration data, "
                                 "so a tokenizer")
        windows, calibration = calibration_windows(model, tokenizer, calib, nsamples, seqlen, seed, sampling)
        logger.info("calibrating on %d windows of %d tokens from %s/%s (sha256 %s), %s-model activations",
                    nsamples, seqlen, calibration["name"], calibration["split"], calibration["sha256_16"],
                    algorithm.calibration_inputs)
    plan, allocation_seconds = plan_layers(model, strategy, slots, sparsity, pattern, windows, batch_size, device)
    named = {slot.name for slot in slots}
    for name, target in (layer_sparsity or {}).items():
        if name in named:  # ignored layers stay dense
            plan.layer_sparsity[name] = check_sparsity(target)
            plan.layer_patterns.pop(name, None)
    report = PruneReport(method, {"name": method} | asdict(algorithm), str(pattern), sparsity, calibration,
                         {"name": strategy.name, "options": strategy.options(), "statistics": strategy.statistics(),
                          "seconds": allocation_seconds})
    joint = quantization is not None and algorithm.joint_quantization
    if quantization is not None:
        report.quantization = quantization.to_dict() | {"applied": "joint" if joint else "gptq"}
    if not calibrate:
        windows = None

    for step in engine.walk(model, windows, batch_size=batch_size, device=device, desc=f"{method} {pattern}"):
        layers = step.layers
        targets = {name: plan.layer_sparsity[name] for name in layers if name in plan.layer_sparsity}
        pruned_layers = {name: layers[name] for name, target in targets.items() if target > 0}
        stats = {}
        if windows is not None and pruned_layers:
            stats = step.collect(lambda name, module: InputStatistics(in_features(module), needs), pruned_layers,
                                 propagate=algorithm.calibration_inputs == "dense")
        elif statistics is not None:
            stats = {name: _cached(statistics, name, needs) for name in pruned_layers}
        solve_started = time.perf_counter()
        results = {}
        for name in targets.keys() - pruned_layers.keys():  # the allocation keeps these dense
            dense = weight_matrix(layers[name])
            results[name] = LayerResult(name, tuple(dense.shape), 0.0, "dense", (dense == 0).float().mean().item(),
                                        0.0, 0.0)
        for group in _shared_input_groups(list(pruned_layers), stats, plan.layer_patterns):
            group_started = time.perf_counter()
            layer_pattern = plan.layer_patterns.get(group[0], pattern)
            dense = [weight_matrix(layers[name]) for name in group]
            sparsities = [targets[name] for name in group]
            quantizers = [LayerQuantizer(quantization, *w.shape, w.device) for w in dense] if quantization else None
            if joint:
                pruned = algorithm.prune_group([w.clone() for w in dense], stats.get(group[0]), sparsities,
                                               layer_pattern, quantizers=quantizers)
            else:
                pruned = algorithm.prune_group([w.clone() for w in dense], stats.get(group[0]), sparsities,
                                               layer_pattern)
                if quantizers is not None:
                    pruned = quantize_masked(pruned, stats[group[0]], quantizers)
            seconds = (time.perf_counter() - group_started) / len(group)
            for index, (name, before, after) in enumerate(zip(group, dense, pruned, strict=True)):
                set_weight_matrix(layers[name], after)
                attach_grid(layers[name], quantizers[index].grid() if quantizers else None)
                probe = stats[name].probe if name in stats else None
                results[name] = LayerResult(name, tuple(before.shape), targets[name], str(layer_pattern),
                                            (after == 0).float().mean().item(),
                                            relative_error(before, after, probe), seconds)
        for name in targets:
            result = results[name]
            report.layers.append(result)
            logger.info("%s %s: sparsity %.4f, relative error %s, %.2f s", name, result.shape,
                        result.sparsity, f"{result.relative_error:.4f}" if result.relative_error is not None
                        else "n/a", result.seconds)
        step.seconds["solve"] = time.perf_counter() - solve_started
        if windows is not None and not step.propagated:
            step.propagate()
        block_layers = [r for r in report.layers if r.name.startswith(step.name + ".")]
        errors = [r.relative_error for r in block_layers if r.relative_error is not None]
        report.blocks.append({"block": step.name, "layers": len(block_layers)} | {
            f"{phase}_seconds": round(sec, 3) for phase, sec in step.seconds.items()})
        logger.info(
            "%s: %d layers, sparsity %.3f, mean rel. error %s, collect %.1fs solve %.1fs propagate %.1fs",
            step.name, len(block_layers),
            sum(r.sparsity for r in block_layers) / max(len(block_layers), 1),
            f"{sum(errors) / len(errors):.4f}" if errors else "n/a",
            step.seconds.get("collect", 0), step.seconds.get("solve", 0), step.seconds.get("propagate", 0),
        )
    report.seconds = time.perf_counter() - started
    logger.info("pruned %d layers to %.4f sparsity with %s %s (%s allocation) in %.1f s", len(report.layers),
                report.achieved_sparsity, method, pattern, strategy.name, report.seconds)
    return report
