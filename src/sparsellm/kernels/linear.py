"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight lives in a kernel layout.

``dispatch="sparse"`` always runs the sparse kernel; ``"auto"`` runs it up to the measured
crossover number of tokens (see ``dispatch``) and the GEMM on decoded blocks beyond, e.g. for
prefill. With ``threshold`` set, inputs with |x| <= threshold are zeroed first (activation
sparsity, TEAL); an input-major layout then reads only the weights of the surviving inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import SparseLLMError
from ..logging_utils import logger
from . import backend, dispatch
from .layouts import Layout, Quantization, build

DISPATCH = ("auto", "sparse")


class SparseLinear(nn.Module):
    def __init__(self, layout: Layout, bias: torch.Tensor | None = None, threshold: float | None = None,
                 dispatch: str = "auto", activation_sparsity: float | None = None):
        super().__init__()
        if dispatch not in DISPATCH:
            raise SparseLLMError(f"unknown dispatch '{dispatch}': use one of {', '.join(DISPATCH)}")
        self.layout = layout  # plain tensors, not buffers: model.to(dtype) must not re-encode them
        self.in_features, self.out_features = layout.in_features, layout.out_features
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.threshold = threshold
        self.activation_sparsity = activation_sparsity  # the target the threshold was calibrated for
        self.dispatch = dispatch
        self.crossover: dict[torch.dtype, int] = {}  # tokens up to which the sparse kernel runs ("auto")
        self.peers: list[SparseLinear] = [self]  # layers of the same key, measured together

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, format: str = "bitmask",
                   dtype: torch.dtype | None = torch.bfloat16, keep: torch.Tensor | None = None,
                   quantization: Quantization | None = None, threshold: float | None = None,
                   input_major: bool | None = None, dispatch: str = "auto") -> SparseLinear:
        """From an (out, in) weight whose pruned entries are zero (or ``keep`` marks the stored ones).

        ``dtype`` is the storage of the values (None: the weight's own); with ``quantization`` the
        weight holds integer codes instead. Activation sparsity (``threshold``) stores the matrix
        input-major unless ``input_major=False``.
        """
        if quantization is None and dtype is not None:
            keep = weight != 0 if keep is None else keep
            weight = weight.to(dtype)
        input_major = threshold is not None if input_major is None else input_major
        layout = build(weight, keep, format=format, quantization=quantization, input_major=input_major)
        return cls(layout, bias, threshold, dispatch)

    def sparse_tokens(self, dtype: torch.dtype) -> int:
        """Up to how many tokens (of inputs in ``dtype``) the sparse kernel runs."""
        if self.dispatch == "sparse":
            return 1 << 62
        measured = self.crossover.get(dtype)
        if measured is None:
            layouts = [peer.layout for peer in self.peers]
            active = self.activation_sparsity if self.threshold is not None else None
            measured = dispatch.crossover(layouts, active, dtype)
            for peer in self.peers:
                peer.crossover[dtype] = measured
        return measured

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        return backend.linear(self.layout, x, self.threshold, tokens <= self.sparse_tokens(x.dtype), self.bias)

    def extra_repr(self) -> str:
        parts = [self.layout.describe(), f"dispatch={self.dispatch}"]
        if self.threshold is not None:
            parts.append(f"threshold={self.threshold:.4g}")
        return ", ".join(parts)


@torch.no_grad()
def forward_if_same(model: nn.Module, modules: list[nn.Module], forward: Callable[[nn.Module], Callable],
                    logits: Callable[[nn.Module], torch.Tensor]) -> bool:
    """Give each of ``modules`` the forward ``forward(module)``, in place, if ``logits(model)`` stays
    bit for bit the same; otherwise leave them their own. Whether they got it.

    The probe runs every ``SparseLinear`` on its sparse kernel: a few tokens should not make
    ``dispatch="auto"`` measure its crossovers."""
    layers = [layer for layer in model.modules() if isinstance(layer, SparseLinear)]
    dispatch = [layer.dispatch for layer in layers]
    for layer in layers:
        layer.dispatch = "sparse"
    try:
        expected = logits(model)
        for module in modules:
            module.forward = forward(module)
        same = torch.equal(logits(model), expected)
    except (TypeError, RuntimeError, AttributeError, ValueError) as error:  # a forward that takes or returns other things
        logger.debug("the new forward does not fit %s: %s", type(modules[0]).__name__, error)
        same = False
    finally:
        for layer, mode in zip(layers, dispatch, strict=True):
            layer.dispatch = mode
    if not same:
        for module in modules:
            module.__dict__.pop("forward", None)
    return same
