"""``RMSNorm``: the Llama family's RMS normalisation as one compiled call.

transformers' module runs eight tensor ops (to float32, pow, mean, add, rsqrt, mul, to, mul); in a
decoding model, where each op cost ~10 us, the two norms of a layer took as long as its attention
projections' kernels. ``fused_norm`` gives this module where it computes the same values: the
candidates are checked against the module they replace on a random input, so a norm with other
semantics (Gemma's 1 + weight, say) stays as it is. ``use_kernels`` does the swapping.
"""

from __future__ import annotations

import torch
from torch import nn

from . import backend


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dimension, computed in float32, the
    normalised x rounded to x's dtype before the weight multiplies it (as transformers rounds)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return backend.extension().rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, fused"


@torch.no_grad()
def fused_norm(module: nn.Module) -> RMSNorm | None:
    """An ``RMSNorm`` computing ``module``'s function on a random input, or None if ``module`` is not
    such a norm. "The same" allows what summing the squares in another order can change: the scale's
    last bit, which float32 outputs carry (up to ~2 units in the last place), 16-bit outputs rarely
    (one unit)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not (type(module).__name__.endswith("RMSNorm") and isinstance(eps, float) and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and weight.is_floating_point()):
        return None
    candidate = RMSNorm(weight, eps)
    x = (torch.randn(5, weight.numel(), generator=torch.Generator().manual_seed(0)) * 3).to(weight.dtype)
    expected, got = module(x), candidate(x)
    if expected.dtype != got.dtype or expected.shape != got.shape:
        return None
    return candidate if bool((abs(got.float() - expected.float()) <= tolerance(expected)).all()) else None


def tolerance(expected: torch.Tensor) -> torch.Tensor:
    """How far the fused norm may be from transformers' module, element by element (see ``fused_norm``)."""
    finfo = torch.finfo(expected.dtype)
    units = 4 if expected.dtype == torch.float32 else 1
    return units * finfo.eps * expected.float().abs().clamp_min(finfo.tiny)
