"""Performer attention (Choromanski et al. 2021): FAVOR+ positive orthogonal random features.

softmax(q k^T / sqrt(d)) is approximated through exp(q . k) = E[phi(q) . phi(k)] with
phi(x) = exp(W x - |x|^2 / 2) (up to a constant that cancels), W holding ``features`` random
rows, orthogonal within each block of d and scaled to the norms of Gaussian vectors. Then

    out_i = phi(q_i) S / phi(q_i) z,   S = sum_j phi(k_j) v_j^T,   z = sum_j phi(k_j),

linear in the sequence length. The causal variant sums over j <= i only: chunk by chunk, the state
(S, z) of all earlier chunks plus a small masked product inside the chunk, so memory stays
O(chunk * features) beyond the inputs. For numerical range, queries are shifted by their row
maximum and keys by one running maximum per head (rescaling the state when it grows); both shifts
cancel in the ratio.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .base import SparseAttention, register
from .blocks import check_shapes, group_heads


@functools.lru_cache(maxsize=256)
def draw_projection(features: int, dim: int, seed: int) -> torch.Tensor:
    """(features, dim) FAVOR+ projection: blocks of orthogonal rows, each row scaled to a chi(dim) norm."""
    generator = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    blocks = []
    for _ in range(-(-features // dim)):
        orthogonal, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        blocks.append(orthogonal.T)
    norms = torch.randn(features, dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (torch.cat(blocks)[:features] * norms).float()


def performer_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, projection: torch.Tensor, *,
                        causal: bool = True, scale: float | None = None, key_mask: torch.Tensor | None = None,
                        chunk: int = 256) -> torch.Tensor:
    """FAVOR+ attention: (B, H, Lq, d) queries, (B, Hkv, Lk, d) keys and values -> (B, H, Lq, d).

    ``projection`` (features, d) comes from ``draw_projection``. Query i sits at key position
    Lk - Lq + i; ``key_mask`` (B, Lk) is True where a key may be attended.
    """
    check_shapes(query, key, value, causal)
    if query.dtype in (torch.float16, torch.bfloat16):  # exp and the running sums need float32's range
        return performer_attention(query.float(), key.float(), value.float(), projection, causal=causal, scale=scale,
                                   key_mask=key_mask, chunk=chunk).to(query.dtype)
    n_queries, n_keys, kv_heads, dim = query.shape[2], key.shape[2], key.shape[1], query.shape[3]
    root_scale = (dim**-0.5 if scale is None else scale) ** 0.5  # exp(s q.k) = exp((r q).(r k)), r = sqrt(s)
    projection = (projection * root_scale).to(query.dtype)
    grouped = group_heads(query, kv_heads)
    batch = query.shape[0]
    state = query.new_zeros(batch, kv_heads, 1, projection.shape[0], dim)
    normalizer = query.new_zeros(batch, kv_heads, 1, projection.shape[0], 1)
    running_max = query.new_full((batch, kv_heads, 1, 1, 1), float("-inf"))

    def key_features(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """phi of keys start..stop-1 on the running scale (rescaling the state first), and their values."""
        nonlocal running_max, state, normalizer
        keys = key[:, :, start:stop].unsqueeze(2)
        logits = keys @ projection.T - keys.square().sum(-1, keepdim=True) * (root_scale**2 / 2)
        new_max = torch.maximum(running_max, logits.amax(dim=(-1, -2), keepdim=True))
        shrink = torch.exp(running_max - new_max)
        state, normalizer = state * shrink, normalizer * shrink
        running_max = new_max
        features = torch.exp(logits - new_max)
        if key_mask is not None:
            features = features * key_mask[:, None, None, start:stop, None]
        return features, value[:, :, start:stop].unsqueeze(2)

    def query_features(start: int, stop: int) -> torch.Tensor:
        queries = grouped[:, :, :, start:stop]
        logits = queries @ projection.T - queries.square().sum(-1, keepdim=True) * (root_scale**2 / 2)
        return torch.exp(logits - logits.amax(-1, keepdim=True))

    def accumulate(features: torch.Tensor, values: torch.Tensor) -> None:
        nonlocal state, normalizer
        state = state + features.transpose(-1, -2) @ values
        normalizer = normalizer + features.sum(-2, keepdim=True).transpose(-1, -2)

    # Keys before the first query (a KV cache's past) are visible to every query: state only.
    visible_to_all = n_keys - n_queries if causal else n_keys
    for start in range(0, visible_to_all, chunk):
        accumulate(*key_features(start, min(start + chunk, visible_to_all)))
    outputs = []
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        if causal:
            features, values = key_features(visible_to_all + start, visible_to_all + stop)
        phi_q = query_features(start, stop)
        numerator, denominator = phi_q @ state, phi_q @ normalizer
        if causal:
            within = (phi_q @ features.transpose(-1, -2)).tril_()
            numerator = numerator + within @ values
            denominator = denominator + within.sum(-1, keepdim=True)
            accumulate(features, values)
        outputs.append(numerator / denominator.clamp_min(torch.finfo(query.dtype).tiny))
    return torch.cat(outputs, dim=3).flatten(1, 2)


@register
@dataclass(frozen=True)
class PerformerAttention(SparseAttention):
    """``features`` random features per layer (seeded by ``seed`` and the layer index); ``redraw``
    N draws new ones every N forward passes in training mode (0: never); ``chunk`` positions per
    step of the causal prefix sums."""

    name = "performer"
    primary = "features"
    features: int = 256
    redraw: int = 0
    seed: int = 0
    chunk: int = 256

    def __post_init__(self) -> None:
        self.require(self.features >= 1, f"features must be at least 1, not {self.features}")
        self.require(self.redraw >= 0, f"redraw must be 0 (never) or more, not {self.redraw}")
        self.require(self.chunk >= 1, f"chunk must be at least 1, not {self.chunk}")

    def projection(self, dim: int, module: torch.nn.Module | None = None) -> torch.Tensor:
        """This layer's features; a new draw every ``redraw`` training passes of ``module``."""
        layer = getattr(module, "layer_idx", 0) or 0
        draw = 0
        if self.redraw and module is not None:
            passes = getattr(module, "_performer_passes", 0)
            if module.training:
                module._performer_passes = passes + 1
            draw = passes // self.redraw
        return draw_projection(self.features, dim, hash((self.seed, layer, draw)))

    def __call__(self, query, key, value, *, causal=True, scale=None, key_mask=None, module=None):
        projection = self.projection(query.shape[-1], module).to(query.device)
        return performer_attention(query, key, value, projection, causal=causal, scale=scale, key_mask=key_mask,
                                   chunk=self.chunk)
