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
from ..format.layout import BITMASK, BITMASK_24, DENSE, EncodedLayer
from ..logging_utils import logger, progress
from ..models import decoder_blocks, linear_layers, load_model, parse_dtype, weight_matrix
from . import backend
from .attention import use_decode_attention, use_rotary_forward
from .decoder import use_decode_layers
from .layouts import Quantization
from .linear import SparseLinear
from .norm import fused_norm

KERNELS = ("auto", "sparse", "dense")
MIN_SPARSITY = 0.2  # below this a bitmask layer reads about as many bytes as a dense one


@dataclass
class KernelReport:
    """What ``use_kernels`` did: layers per format, and bytes of their weights dense and in kernel layouts."""

    backend: str
    layers: Counter = field(default_factory=Counter)
    dense_bytes: int = 0  # the kernel layers' weights as dense matrices in the model's dtype
    dense_dtype: torch.dtype = torch.float32
    kernel_bytes: int = 0
    packed_moe_layers: int = 0  # MoE layers whose experts are in the kernels' layout
    fused_norms: int = 0  # RMS norms run as one compiled call (norm.py)
    decode_attention: bool = False  # a decoded token's attention in one compiled call (attention.py)
    rotary_attention: int = 0  # attention modules whose heads and rotary embedding are one call (attention.py)
    decode_layers: int = 0  # decoder layers that decode a token in direct calls (decoder.py)

    def describe(self) -> str:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.layers.items()))
        moe = f"; {self.packed_moe_layers} MoE layers' experts packed" if self.packed_moe_layers else ""
        norms = f"; {self.fused_norms} RMS norms fused" if self.fused_norms else ""
        attention = "; decoding's attention compiled" if self.decode_attention else ""
        attention += f"; {self.rotary_attention} attention layers' rotary embedding fused" if self.rotary_attention else ""
        attention += f"; {self.decode_layers} decoder layers decode in direct calls" if self.decode_layers else ""
        dense = f"{self.dense_bytes / 1e6:.1f} MB dense {str(self.dense_dtype).removeprefix('torch.')}"
        return (f"{kinds or 'no layers'} on {self.backend} kernels; their weights {dense} -> "
                f"{self.kernel_bytes / 1e6:.1f} MB{moe}{norms}{attention}")


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
                dense_layers: bool = False, fuse: bool = True) -> KernelReport:
    """Replace the pruned linear layers of ``model``'s decoder blocks by ``SparseLinear``, in place.

    ``dtype`` is the storage of the values (None: the model's); ``thresholds`` maps layer names to
    activation thresholds (TEAL), whose targets ``activation_sparsity`` holds. ``dense_layers``
    also moves the unpruned linear layers and the output layer to the dense kernel (worth it with
    16-bit values, which it reads faster than torch does). Layers that are ``SparseLinear`` already
    stay. MoE layers' experts (float32) are packed for the MoE kernels (``pack_experts``). With
    ``fuse``, RMS norms become one compiled call each (``norm.fused_norm``) where that computes the same
    values, and so does a decoded token's attention in models that use torch's SDPA, with the split
    into heads and the rotary embedding of Llama-shaped attention (``attention``), and Llama-shaped
    decoder layers decode a token in direct calls (``decoder``). ``kernels="dense"`` leaves the
    model as it is.
    """
    if kernels not in KERNELS:
        raise SparseLLMError(f"unknown kernels '{kernels}': use one of {', '.join(KERNELS)}")
    report = KernelReport(backend.current().name)
    if kernels == "dense":
        return report
    thresholds, targets = thresholds or {}, activation_sparsity or {}

    def replace(name: str, module: nn.Module, weight: torch.Tensor, kind: str, keep: torch.Tensor | None) -> None:
        layer = SparseLinear.from_dense(weight.to(dtype or module.weight.dtype), module.bias, format=kind, dtype=None,
                                        keep=keep, threshold=thresholds.get(name), dispatch=kernels)
        layer.activation_sparsity = targets.get(name)
        _set_module(model, name, layer)

    prefix, blocks = decoder_blocks(model)
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
    _measure_together(model, report)
    if fuse and report.backend != "torch":
        for name, module in list(model.named_modules()):
            norm = fused_norm(module)
            if norm is not None:
                _set_module(model, name, norm)
                report.fused_norms += 1
        report.decode_attention = use_decode_attention(model)
        report.rotary_attention = use_rotary_forward(model) if report.decode_attention else 0
        report.decode_layers = use_decode_layers(model) if report.rotary_attention else 0
    # imported here: importing the MoE package registers its model type with transformers
    from ..activations.moe.modeling import pack_experts

    report.packed_moe_layers = pack_experts(model)
    logger.info("kernels=%s: %s", kernels, report.describe())
    return report


def _measure_together(model: nn.Module, report: KernelReport) -> None:
    """Let layers of the same shape and format share one measured crossover; count them and their bytes."""
    peers: dict[tuple, list[SparseLinear]] = defaultdict(list)
    # layers built from a compact folder never were dense: count them as the model's dtype would hold them
    report.dense_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for module in model.modules():
        if isinstance(module, SparseLinear):
            layout = module.layout
            peers[(layout.format, layout.codec, layout.input_major, layout.out_features, layout.in_features,
                   module.activation_sparsity)].append(module)
            report.layers[layout.describe().rsplit(" ", 1)[0]] += 1
            report.kernel_bytes += layout.nbytes
            report.dense_bytes += layout.out_features * layout.in_features * report.dense_dtype.itemsize
    for group in peers.values():
        for layer in group:
            layer.peers = group


# Compact layouts (sparsellm.format) and the kernel format that runs each.
_KERNEL_FORMATS = {BITMASK: "bitmask", BITMASK_24: "2:4", DENSE: "dense"}


def from_encoded(layer: EncodedLayer, module: nn.Module, *, dispatch: str = "auto", threshold: float | None = None,
                 dtype: torch.dtype | None = None, dense_layers: bool = False) -> SparseLinear | None:
    """A kernel layer straight from a compact checkpoint's packed layer (integer codes stay codes).

    None for a float layer stored dense, which the kernels would not speed up (unless it has an
    activation threshold or ``dense_layers``). ``dtype`` is the storage of float values (None: as saved).
    """
    kind = _KERNEL_FORMATS.get(layer.layout) or ("2:4" if (layer.pattern.n, layer.pattern.m) == (2, 4) else "bitmask")
    if kind == "dense" and layer.scheme is None and threshold is None and not dense_layers:
        return None
    keep = layer.stored_mask()
    bias = getattr(module, "bias", None)
    scheme = layer.scheme
    columns = layer.shape[1]
    if scheme is not None and (scheme.group_size == 0 or scheme.group_size >= columns or scheme.group_size % 64 == 0):
        grid = layer.grid()
        codes = torch.zeros(layer.shape, dtype=torch.uint8).masked_scatter_(keep, layer.stored_codes())
        group = scheme.group_size if 0 < scheme.group_size < columns else 0
        quantization = Quantization(scheme.bits, group, grid.scale, grid.zero_point)
        return SparseLinear.from_dense(codes, bias, format=kind, keep=keep, quantization=quantization,
                                       threshold=threshold, dispatch=dispatch)
    if scheme is not None:  # codes in groups the kernels do not take: run their dequantized values
        logger.debug("%s: quantization groups of %d columns; running dequantized values", layer.name,
                     scheme.group_size)
    values = layer.stored_values(keep)
    values = values.to(dtype or values.dtype)
    weight = torch.zeros(layer.shape, dtype=values.dtype).masked_scatter_(keep, values)
    return SparseLinear.from_dense(weight, bias, format=kind, dtype=None, keep=keep, threshold=threshold,
                                   dispatch=dispatch)


def load(folder: str | os.PathLike, dtype: torch.dtype | str = torch.float32, kernels: str = "auto", *,
         weight_dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model from a pruned folder (compact or dense), its pruned linears on the kernels.

    ``kernels="auto"`` runs each layer's sparse kernel up to its measured crossover number of
    tokens and the dense path beyond; ``"sparse"`` always the sparse kernel; ``"dense"`` rebuilds
    the plain transformers model. A compact folder's packed layers become kernel layouts directly,
    never dense weights. ``dtype`` is the compute dtype (activations, layers left dense); "auto"
    takes ``backend.compute_dtype()`` for this CPU, with bfloat16 values unless ``weight_dtype`` says
    otherwise;
    ``weight_dtype`` the storage of float values (None: ``dtype`` when it is 16-bit, else as saved in
    a compact folder and ``dtype`` in a dense one); with 16-bit values the unpruned linear layers and
    the output layer run on the dense kernel too. Activation thresholds saved with the model
    (``sparsellm sparsify-activations``) apply in every setting (as hooks with ``"dense"``), so all
    compute the same function.
    """
    from ..activations import teal
    from ..format import compact

    if dtype == "auto":
        dtype, weight_dtype = backend.compute_dtype(), weight_dtype or torch.bfloat16
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if kernels not in KERNELS:
        raise SparseLLMError(f"unknown kernels '{kernels}': use one of {', '.join(KERNELS)}")
    activations = teal.ActivationSparsity.read(folder)
    thresholds = activations.thresholds if activations else {}
    targets = activations.targets if activations else {}
    if kernels == "dense":
        # a compact folder needs no tokenizer to give its model
        model = compact.load(folder, dtype).eval() if compact.is_compact(folder) else load_model(folder, dtype=dtype)[0]
        if activations is not None:
            activations.attach(model)
        return model
    if weight_dtype is None and dtype in (torch.bfloat16, torch.float16):
        # a float32 compact folder would otherwise keep float32 values under a bfloat16 model: twice
        # the bytes, and a float32 GEMM on the dense path (measured: sample prefill 2.1x slower)
        weight_dtype = dtype
    dense_layers = (weight_dtype or dtype) in (torch.bfloat16, torch.float16)
    if compact.is_compact(folder):
        def replace(layer: EncodedLayer, module: nn.Module) -> SparseLinear | None:
            built = from_encoded(layer, module, dispatch=kernels, threshold=thresholds.get(layer.name),
                                 dtype=weight_dtype, dense_layers=dense_layers)
            if built is not None:
                built.activation_sparsity = targets.get(layer.name)
            return built

        model = compact.load(folder, dtype, replace=replace)
    else:
        model = load_model(folder, dtype=dtype)[0]
    use_kernels(model, kernels, dtype=weight_dtype, thresholds=thresholds, activation_sparsity=targets,
                dense_layers=dense_layers)
    return model
