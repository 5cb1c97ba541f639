"""Run a whole model on the kernels: swap its pruned linear layers for ``SparseLinear``.

Each prunable linear layer of the decoder blocks is stored in the format that suits its weights:
``2:4`` when every group of four inputs keeps at most two, ``bitmask`` when enough is pruned for
the bitmask to pay, and left as it is otherwise, unless it has an activation threshold, which
needs the input-major layout. Layers of the same shape and format are measured together for
``kernels="auto"`` (see ``dispatch``).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SparseLLMError
from ..logging_utils import logger, progress
from ..models import decoder_blocks, linear_layers, load_model, weight_matrix
from . import backend
from .linear import SparseLinear

KERNELS = ("auto", "sparse", "dense")
MIN_SPARSITY = 0.2  # below this a bitmask layer reads about as many bytes as a dense one


@dataclass
class KernelReport:
    """What ``use_kernels`` did: layers per format, and bytes of their weights before and after."""

    backend: str
    layers: Counter = field(default_factory=Counter)
    dense_bytes: int = 0
    kernel_bytes: int = 0

    def describe(self) -> str:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.layers.items()))
        return (f"{kinds or 'no layers'} on {self.backend} kernels; their weights "
                f"{self.dense_bytes / 1e6:.1f} MB -> {self.kernel_bytes / 1e6:.1f} MB")


def choose_format(keep: torch.Tensor) -> str:
    """``2:4``, ``bitmask`` or ``dense`` for a keep-mask."""
    rows, columns = keep.shape
    if columns % 4 == 0 and bool((keep.reshape(rows, columns // 4, 4).sum(-1) <= 2).all()):
        return "2:4"
    return "bitmask" if 1.0 - keep.float().mean().item() >= MIN_SPARSITY else "dense"


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def use_kernels(model: nn.Module, kernels: str = "auto", *, dtype: torch.dtype | None = None,
                thresholds: dict[str, float] | None = None, activation_sparsity: dict[str, float] | None = None,
                dense_layers: bool = False) -> KernelReport:
    """Replace the pruned linear layers of ``model``'s decoder blocks by ``SparseLinear``, in place.

    ``dtype`` is the storage of the values (None: the model's); ``thresholds`` maps layer names to
    activation thresholds (TEAL), whose targets ``activation_sparsity`` holds. ``dense_layers``
    also moves the unpruned linear layers and the output layer to the dense kernel (worth it with
    16-bit values, which it reads faster than torch does). ``kernels="dense"`` leaves the model as it is.
    """
    if kernels not in KERNELS:
        raise SparseLLMError(f"unknown kernels '{kernels}': use one of {', '.join(KERNELS)}")
    report = KernelReport(backend.current().name)
    if kernels == "dense":
        return report
    thresholds, targets = thresholds or {}, activation_sparsity or {}
    prefix, blocks = decoder_blocks(model)
    peers: dict[tuple, list[SparseLinear]] = defaultdict(list)

    def replace(name: str, module: nn.Module, weight: torch.Tensor, kind: str, keep: torch.Tensor | None) -> None:
        layer = SparseLinear.from_dense(weight.to(dtype or module.weight.dtype), module.bias, format=kind, dtype=None,
                                        keep=keep, threshold=thresholds.get(name), dispatch=kernels)
        layer.activation_sparsity = targets.get(name)
        _set_module(model, name, layer)
        layout = layer.layout
        report.layers[layout.describe().rsplit(" ", 1)[0]] += 1
        report.dense_bytes += module.weight.numel() * module.weight.element_size()
        report.kernel_bytes += layout.nbytes
        peers[(layout.format, layout.codec, layout.input_major, layout.out_features, layout.in_features,
               layer.activation_sparsity)].append(layer)

    for index in progress(range(len(blocks)), desc="kernel layouts", unit="block"):
        for name, module in linear_layers(blocks[index], f"{prefix}.{index}").items():
            weight = weight_matrix(module)
            keep = weight != 0
            kind = choose_format(keep)
            if kind != "dense" or name in thresholds or dense_layers:
                replace(name, module, weight, kind, keep)
    head = model.get_output_embeddings()
    if dense_layers and isinstance(head, nn.Linear):
        name = next(name for name, module in model.named_modules() if module is head)
        replace(name, head, head.weight.detach(), "dense", None)
    for group in peers.values():
        for layer in group:
            layer.peers = group
    logger.info("kernels=%s: %s", kernels, report.describe())
    return report


def load(folder: str | os.PathLike, kernels: str = "auto", *, dtype: torch.dtype = torch.float32,
         weight_dtype: torch.dtype | None = None):
    """Load a pruned model folder to run on the kernels: ``(model, tokenizer)``.

    ``dtype`` is the model's compute dtype (activations, dense layers); ``weight_dtype`` the storage
    of the sparse layers' values (None: ``dtype``; bfloat16 halves the bytes read per token).
    With 16-bit values the unpruned linear layers and the output layer run on the dense kernel
    too. Activation thresholds saved with the model
    (``sparsellm sparsify-activations``) are applied, by the kernels or, with ``kernels="dense"``,
    by hooks on the dense layers, so every setting computes the same function.
    """
    from ..activations import teal

    model, tokenizer = load_model(folder, dtype=dtype)
    activations = teal.ActivationSparsity.read(folder)
    if kernels == "dense":
        if activations is not None:
            activations.attach(model)
        return model, tokenizer
    stored = weight_dtype or dtype
    use_kernels(model, kernels, dtype=weight_dtype, thresholds=activations.thresholds if activations else None,
                activation_sparsity=activations.targets if activations else None,
                dense_layers=stored in (torch.bfloat16, torch.float16))
    return model, tokenizer
