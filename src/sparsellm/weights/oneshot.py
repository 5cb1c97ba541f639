"""One-shot pruning of a causal LM: ``sparsellm.prune(model, tokenizer, method=..., sparsity=...)``.

Block by block (see ``engine``): gather the statistics the method needs for all linear layers of
the block in one pass over the calibration windows, prune each layer, then re-run the pruned block
so the next block calibrates on what the pruned model really produces.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .. import engine
from ..data import Text, check_context, load_text, token_windows
from ..errors import SparseLLMError
from ..logging_utils import logger
from ..models import in_features, set_weight_matrix, weight_matrix
from .base import InputStatistics, get_method
from .masks import Pattern, check_sparsity


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
    sparsity: float
    calibration: dict | None
    layers: list[LayerResult] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)
    seconds: float = 0.0

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


def _targets(names: Sequence[str], sparsity: float, pattern: Pattern, ignore: Sequence[str],
             layer_sparsity: Mapping[str, float] | None) -> dict[str, float]:
    ignored = [re.compile(expr) for expr in ignore]
    targets = {}
    for name in names:
        if any(expr.search(name) for expr in ignored):
            continue
        target = layer_sparsity.get(name, sparsity) if layer_sparsity else sparsity
        if target > 0:
            targets[name] = check_sparsity(target)
    return targets


def _shared_input_groups(names: list[str], stats: dict) -> list[list[str]]:
    """Layers that share one statistics object (they read the same input), in module order."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(id(stats[name]) if name in stats else id(name), []).append(name)
    return list(groups.values())


def relative_error(before: torch.Tensor, after: torch.Tensor, probe: torch.Tensor | None) -> float | None:
    if probe is None or probe.numel() == 0:
        return None
    probe = probe.to(before.device)
    reference = probe @ before.t()
    return ((probe @ (before - after).t()).norm() / reference.norm().clamp_min(1e-12)).item()


def prune(model, tokenizer=None, *, method: str = "sparsegpt", sparsity: float | None = 0.5,
          pattern: str | Pattern = "unstructured", calib: str | Text = "builtin", nsamples: int = 64,
          seqlen: int = 512, seed: int = 0, sampling: str = "consecutive", ignore: Sequence[str] = (),
          layer_sparsity: Mapping[str, float] | None = None, device: str | None = None,
          batch_size: int = 8, **method_options) -> PruneReport:
    """Prune every linear layer inside the decoder blocks of ``model``, in place.

    ``pattern`` is ``"unstructured"`` or ``"N:M"`` (N kept of every M inputs; it implies the
    sparsity, so ``sparsity`` may be None). ``ignore`` holds regexes of layer names left dense;
    ``layer_sparsity`` maps layer names to their own sparsity. Methods that need calibration data
    (Wanda, SparseGPT) read ``nsamples`` windows of ``seqlen`` tokens from ``calib``.
    Embeddings and the LM head are never pruned.
    """
    started = time.perf_counter()
    pattern = Pattern.parse(pattern)
    if pattern.is_nm:
        if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-9:
            raise SparseLLMError(f"pattern {pattern} implies sparsity {pattern.sparsity:g}, not {sparsity:g}")
        sparsity = pattern.sparsity
    elif sparsity is None:
        raise SparseLLMError("give a sparsity (or an N:M pattern)")
    sparsity = check_sparsity(sparsity)
    algorithm = get_method(method, **method_options)
    windows, calibration = None, None
    if algorithm.needs:
        if tokenizer is None:
            raise SparseLLMError(f"method {method} needs calibration data, so a tokenizer")
        windows, calibration = calibration_windows(model, tokenizer, calib, nsamples, seqlen, seed, sampling)
        logger.info("calibrating on %d windows of %d tokens from %s/%s (sha256 %s)", nsamples, seqlen,
                    calibration["name"], calibration["split"], calibration["sha256_16"])
    report = PruneReport(method, {"name": method} | asdict(algorithm), str(pattern), sparsity, calibration)

    for step in engine.walk(model, windows, batch_size=batch_size, device=device, desc=f"{method} {pattern}"):
        layers = step.layers
        targets = _targets(list(layers), sparsity, pattern, ignore, layer_sparsity)
        for name in targets:
            pattern.check_width(in_features(layers[name]), name)
        stats = {}
        if windows is not None and targets:
            stats = step.collect(lambda name, module: InputStatistics(in_features(module), algorithm.needs),
                                 {name: layers[name] for name in targets})
        solve_started = time.perf_counter()
        results = {}
        for group in _shared_input_groups(list(targets), stats):
            group_started = time.perf_counter()
            dense = [weight_matrix(layers[name]) for name in group]
            pruned = algorithm.prune_group([w.clone() for w in dense], stats.get(group[0]),
                                           [targets[name] for name in group], pattern)
            seconds = (time.perf_counter() - group_started) / len(group)
            for name, before, after in zip(group, dense, pruned, strict=True):
                set_weight_matrix(layers[name], after)
                probe = stats[name].probe if name in stats else None
                results[name] = LayerResult(name, tuple(before.shape), targets[name], str(pattern),
                                            (after == 0).float().mean().item(),
                                            relative_error(before, after, probe), seconds)
        for name in targets:
            result = results[name]
            report.layers.append(result)
            logger.info("%s %s: sparsity %.4f, relative error %s, %.2f s", name, result.shape,
                        result.sparsity, f"{result.relative_error:.4f}" if result.relative_error is not None
                        else "n/a", result.seconds)
        step.seconds["solve"] = time.perf_counter() - solve_started
        if windows is not None:
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
    logger.info("pruned %d layers to %.4f sparsity with %s %s in %.1f s", len(report.layers),
                report.achieved_sparsity, method, pattern, report.seconds)
    return report
