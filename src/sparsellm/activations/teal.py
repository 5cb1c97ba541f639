"""TEAL: training-free activation sparsity by magnitude thresholds on every projection's input.

Each linear layer of the decoder blocks gets a threshold t; at run time its inputs with |x| <= t
are zeroed, so a kernel that stores the weight input-major reads only the rows of the surviving
inputs. Thresholds come from histograms of the inputs on calibration text, gathered in one pass per
block with the shared engine; q/k/v see the same tensor (the attention input), as do gate/up (the
MLP input), so they share one histogram, while o and down each have their own.

Where TEAL fits a symmetric distribution (t = icdf(0.5 + p/2) of the signed input), the histogram
here is of |x| directly and t its p-quantile: the same for symmetric inputs, and still right for
skewed ones such as the input of down_proj (act(gate) * up).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import engine
from ..data import Text, load_text, token_windows
from ..errors import SparseLLMError
from ..evaluation import model_device
from ..kernels.reference import threshold
from ..logging_utils import logger, progress
from ..models import in_features
from ..weights.masks import check_sparsity
from ..weights.oneshot import calibration_windows

BINS = 1 << 14
TAIL_QUANTILE = 0.99  # the regular bins reach at least this quantile of every batch; one bin holds the rest
HEADROOM = 4.0  # the first edge: this many times the first batch's quantile, so later batches rarely widen it
SAMPLE = 1 << 16  # values a batch's quantile is estimated from
FILE = "activation_sparsity.json"


@dataclass
class AbsHistogram:
    """Histogram of |x| over every element of a layer's input, batch after batch.

    ``BINS`` equal bins span [0, edge); values above go to one tail bin. When a batch reaches
    further, the edge doubles and neighbouring bins merge (values already in the tail stay there).
    """

    features: int
    counts: torch.Tensor | None = None  # BINS regular bins, then the tail bin
    edge: float = 0.0  # upper end of the regular bins
    peak: float = 0.0  # largest |x| seen: the upper end of the tail bin

    def add_batch(self, inputs: torch.Tensor, sequences: int | None = None) -> None:
        values = inputs.detach().reshape(-1).abs().float()
        step = max(1, values.numel() // SAMPLE)
        reach = torch.quantile(values[::step][:SAMPLE], TAIL_QUANTILE).item()
        if self.counts is None:
            self.edge = HEADROOM * reach if reach > 0 else max(values.max().item(), 1e-12)
            self.counts = torch.zeros(BINS + 1, dtype=torch.float64)
        while reach > self.edge:
            merged = self.counts[:BINS].view(-1, 2).sum(1)
            self.counts[:BINS] = torch.cat([merged, torch.zeros_like(merged)])
            self.edge *= 2
        index = (values * (BINS / self.edge)).floor_().clamp_(max=BINS).long()
        self.counts += torch.bincount(index, minlength=BINS + 1).double()
        self.peak = max(self.peak, values.max().item())

    def quantile(self, fraction: float) -> float:
        """The t with a share ``fraction`` of |x| at or below it, linear within a bin."""
        if self.counts is None:
            raise RuntimeError("no inputs were seen")
        cumulative = torch.cumsum(self.counts, 0) / self.counts.sum()
        index = min(int(torch.searchsorted(cumulative, torch.tensor([fraction], dtype=torch.float64))), BINS)
        below = cumulative[index - 1].item() if index else 0.0
        share = self.counts[index].item() / self.counts.sum().item()
        lower = index * self.edge / BINS
        upper = (index + 1) * self.edge / BINS if index < BINS else max(self.peak, self.edge)
        return lower + (upper - lower) * ((fraction - below) / share if share > 0 else 0.0)


@dataclass
class ActivationSparsity:
    """Per-layer thresholds and the sparsity each was calibrated for; saved as activation_sparsity.json."""

    sparsity: float
    thresholds: dict[str, float]
    targets: dict[str, float]
    calibration: dict | None = None
    held_out: dict[str, float] | None = None  # sparsity reached on held-out text, per layer
    handles: list = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("handles")
        return data

    def write(self, folder: str | os.PathLike) -> Path:
        """Write (atomically) into a model folder; ``load`` applies it."""
        path = Path(folder) / FILE
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{FILE}.")
        with os.fdopen(handle, "w") as stream:
            json.dump(self.to_dict(), stream, indent=2)
        os.replace(temporary, path)
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike) -> ActivationSparsity | None:
        path = Path(folder) / FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(float(data["sparsity"]), {k: float(v) for k, v in data["thresholds"].items()},
                       {k: float(v) for k, v in data["targets"].items()}, data.get("calibration"),
                       data.get("held_out"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SparseLLMError(f"{path} is not a valid activation sparsity file: {exc}") from exc

    def attach(self, model: nn.Module) -> ActivationSparsity:
        """Zero the small inputs of the model's layers from now on (forward pre-hooks; ``detach`` undoes)."""
        self.detach()
        modules = dict(model.named_modules())
        missing = sorted(set(self.thresholds) - set(modules))
        if missing:
            raise SparseLLMError(f"activation thresholds for layers this model lacks, e.g. {missing[0]}")
        for name, value in self.thresholds.items():
            def pre_hook(module, args, value=value):
                return (threshold(args[0], value), *args[1:])
            self.handles.append(modules[name].register_forward_pre_hook(pre_hook))
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def calibrate(model: nn.Module, tokenizer, sparsity: float = 0.5, *, calib: str | Text = "builtin",
              nsamples: int = 32, seqlen: int = 512, layer_sparsity: Mapping[str, float] | None = None,
              batch_size: int = 8, device: str | None = None, windows: torch.Tensor | None = None,
              ) -> ActivationSparsity:
    """Thresholds that zero a share ``sparsity`` of every layer's inputs on the calibration text.

    ``layer_sparsity`` maps layer names to their own target; ``windows`` (token ids, (n, seqlen))
    replace the calibration text. The model is not changed.
    """
    sparsity = check_sparsity(sparsity)
    if windows is None:
        windows, description = calibration_windows(model, tokenizer, calib, nsamples, seqlen)
    else:
        description = {"name": "token windows", "nsamples": len(windows), "seqlen": windows.shape[1]}
        nsamples, seqlen = windows.shape
    thresholds, targets = {}, {}
    for step in engine.walk(model, windows, batch_size=batch_size, device=device, desc="activation histograms"):
        histograms = step.collect(lambda name, module: AbsHistogram(in_features(module)))
        for name, histogram in histograms.items():
            targets[name] = check_sparsity(layer_sparsity.get(name, sparsity) if layer_sparsity else sparsity)
            thresholds[name] = histogram.quantile(targets[name])
    logger.info("activation thresholds for %d layers at sparsity %.2f from %d windows of %d tokens",
                len(thresholds), sparsity, nsamples, seqlen)
    return ActivationSparsity(sparsity, thresholds, targets, description)


@torch.no_grad()
def held_out_sparsity(model: nn.Module, tokenizer, result: ActivationSparsity, data: str | Text = "builtin",
                      seqlen: int = 512, windows: int = 8, batch_size: int = 4) -> dict[str, float]:
    """The share of each layer's inputs that the thresholds zero on evaluation text."""
    text = data if isinstance(data, Text) else load_text(data, "evaluation")
    ids = token_windows(tokenizer, text, seqlen)[:windows]
    modules = dict(model.named_modules())
    zeroed = dict.fromkeys(result.thresholds, 0)
    total = dict.fromkeys(result.thresholds, 0)

    def counter(name: str):
        def pre_hook(module, args):
            zeroed[name] += int((args[0].abs() <= result.thresholds[name]).sum())
            total[name] += args[0].numel()
        return pre_hook

    handles = [modules[name].register_forward_pre_hook(counter(name)) for name in result.thresholds]
    try:
        device = model_device(model)
        for start in progress(range(0, len(ids), batch_size), desc="held-out sparsity", unit="batch"):
            model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    result.held_out = {name: zeroed[name] / total[name] if total[name] else math.nan for name in zeroed}
    return result.held_out


def sparsify_activations(model: nn.Module, tokenizer, sparsity: float = 0.5, **options) -> ActivationSparsity:
    """Calibrate thresholds and attach them to ``model`` (one call; ``.detach()`` removes them)."""
    return calibrate(model, tokenizer, sparsity, **options).attach(model)
