"""BigBird block-sparse attention (Zaheer et al. 2020): window, global and random key blocks.

The sequence is cut into blocks of ``block`` positions. Query block i attends the key blocks
- global: the first ``global_blocks`` blocks (without the causal mask, their queries also attend
  every key, as BigBird's global tokens do);
- window: i - window_blocks .. i + window_blocks (causal: up to i, the diagonal block masked
  token by token);
- random: ``random_blocks`` blocks drawn among the rest (causal: among the earlier ones), from a
  generator seeded by (seed, layer, i), so a block draws the same keys whatever the sequence
  length: prefill and generation with a KV cache agree.
Slots that fall outside the sequence, or repeat a block already chosen, are masked out.

Each query block gathers its ``(global + random + window) * block`` keys and all blocks run as
one batched attention; blocks in the interior of the sequence share one mask (fused SDPA), the
first and last ones carry their own. Nothing of size n x n is built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import SparseAttention, register
from .blocks import attend_blocks, check_shapes, gather_rows, group_heads


def random_blocks_of(query_block: int, n_key_blocks: int, window_blocks: int, global_blocks: int,
                     random_blocks: int, causal: bool, seed: int) -> list[int]:
    """The random key blocks of one query block: drawn among blocks that are neither global nor in its window."""
    if causal:
        candidates = list(range(global_blocks, query_block - window_blocks))
    else:
        candidates = [j for j in range(global_blocks, n_key_blocks) if abs(j - query_block) > window_blocks]
    generator = torch.Generator().manual_seed(hash((seed, query_block)) & 0x7FFF_FFFF_FFFF_FFFF)
    picks = torch.randperm(len(candidates), generator=generator)[:random_blocks]
    return sorted(candidates[j] for j in picks.tolist())


@functools.lru_cache(maxsize=64)
def key_block_layout(first_block: int, last_block: int, n_key_blocks: int, window_blocks: int,
                     global_blocks: int, random_blocks: int, causal: bool, seed: int) -> torch.Tensor:
    """Key block per slot for query blocks first..last-1: (blocks, slots), -1 where a slot is empty.

    Slots: the global blocks, then the random ones, then the window (the diagonal block at the
    same slot for every query block, so interior blocks share one mask).
    """
    window = range(-window_blocks, (0 if causal else window_blocks) + 1)
    layout = []
    for i in range(first_block, last_block):
        near = [i + offset if 0 <= i + offset < n_key_blocks else -1 for offset in window]
        far = random_blocks_of(i, n_key_blocks, window_blocks, global_blocks, random_blocks, causal, seed)
        far += [-1] * (random_blocks - len(far))
        # A global block inside the window is attended once, through its window slot.
        glob = [j if j < n_key_blocks and j not in near and (not causal or j <= i) else -1
                for j in range(global_blocks)]
        layout.append(glob + far + near)
    return torch.tensor(layout, dtype=torch.long).reshape(last_block - first_block, -1)


def bigbird_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block: int = 64, *,
                      window_blocks: int = 1, global_blocks: int = 2, random_blocks: int = 3, seed: int = 0,
                      causal: bool = True, scale: float | None = None,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """BigBird attention: (B, H, Lq, d) queries, (B, Hkv, Lk, d) keys and values -> (B, H, Lq, d).

    Query i sits at key position Lk - Lq + i; blocks are counted from key position 0, so with a
    KV cache the key tensor must start at the first token. ``key_mask`` (B, Lk): True = attend.
    """
    check_shapes(query, key, value, causal)
    n_queries, n_keys, kv_heads = query.shape[2], key.shape[2], key.shape[1]
    device = query.device
    offset = n_keys - n_queries
    n_key_blocks = -(-n_keys // block)
    first_block, last_block = offset // block, n_key_blocks  # query blocks holding the queries
    layout = key_block_layout(first_block, last_block, n_key_blocks, window_blocks, global_blocks,
                              random_blocks, causal, seed).to(device)
    slots = layout.shape[1]
    grouped = group_heads(query, kv_heads)
    within = torch.arange(block, device=device)
    # Query rows of all query blocks, padded at both ends to whole blocks.
    padded_rows = torch.arange(first_block * block, last_block * block, device=device) - offset
    padded = gather_rows(grouped, padded_rows[None])[:, :, :, 0].unflatten(3, (last_block - first_block, block))

    # Interior blocks: every slot filled, all positions real, no padding mask.
    if causal:
        lo = max(global_blocks + window_blocks + random_blocks, -(-offset // block))
        hi = n_keys // block
        shared = torch.ones(block, slots * block, dtype=torch.bool, device=device)
        shared[:, -block:] = within[None, :] <= within[:, None]  # the diagonal block, last slot
    else:
        # A partial last block may be drawn as a random block, and then needs a mask.
        enough = n_key_blocks - global_blocks - (2 * window_blocks + 1) >= random_blocks
        lo = global_blocks + window_blocks
        hi = n_keys // block - window_blocks if enough and n_keys % block == 0 else lo
        shared = None
    if key_mask is not None:
        lo = hi = first_block
    lo = min(max(lo, first_block), last_block)
    hi = max(lo, min(hi, last_block))
    parts = []
    if hi > lo:
        positions = (layout[lo - first_block : hi - first_block, :, None] * block + within).flatten(1)
        queries = padded[:, :, :, lo - first_block : hi - first_block]
        parts.append(attend_blocks(queries, gather_rows(key, positions), gather_rows(value, positions), shared, scale))

    edges = torch.tensor([*range(first_block, lo), *range(hi, last_block)], dtype=torch.long, device=device)
    if len(edges):
        slot_blocks = layout[edges - first_block]
        positions = (slot_blocks[:, :, None] * block + within).flatten(1)  # (E, slots * block)
        filled = (slot_blocks >= 0).repeat_interleave(block, dim=1) & (positions < n_keys)
        allowed = filled[:, None, :].expand(-1, block, -1)
        if causal:
            query_positions = edges[:, None] * block + within
            allowed = allowed & (positions[:, None, :] <= query_positions[:, :, None])
        allowed = allowed.unsqueeze(0)
        if key_mask is not None:
            allowed = allowed & key_mask[:, positions.clamp(0, n_keys - 1)][:, :, None, :]
        result = attend_blocks(padded[:, :, :, edges - first_block], gather_rows(key, positions),
                               gather_rows(value, positions), allowed, scale)
        before = lo - first_block
        parts = [result[:, :, :, :before], *parts, result[:, :, :, before:]]
    # Blocks in order: the edge blocks before the interior, the interior, the edge blocks after.
    start = offset - first_block * block
    out = torch.cat(parts, dim=3).flatten(3, 4)[:, :, :, start : start + n_queries]

    if not causal and global_blocks:
        # Global queries read every key.
        rows = min(global_blocks * block, n_queries)
        mask = None if key_mask is None else key_mask[:, None, None, None, :]
        keys, values = (tensor.unsqueeze(2).expand(-1, -1, grouped.shape[2], -1, -1) for tensor in (key, value))
        full_rows = F.scaled_dot_product_attention(grouped[:, :, :, :rows], keys, values, attn_mask=mask, scale=scale)
        out = torch.cat([full_rows, out[:, :, :, rows:]], dim=3)
    return out.flatten(1, 2)


@register
@dataclass(frozen=True)
class BigBirdAttention(SparseAttention):
    """Blocks of ``block`` tokens; ``window_blocks`` on each side, ``global_blocks`` first blocks,
    ``random_blocks`` drawn per query block (seeded)."""

    name = "bigbird"
    primary = "block"
    aliases = {"window": "window_blocks", "global": "global_blocks", "random": "random_blocks"}  # noqa: RUF012
    block: int = 64
    window_blocks: int = 1
    global_blocks: int = 2
    random_blocks: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        self.require(self.block >= 1, f"block must be at least 1, not {self.block}")
        for option in ("window_blocks", "global_blocks", "random_blocks"):
            self.require(getattr(self, option) >= 0, f"{option} must be 0 or more, not {getattr(self, option)}")

    @property
    def counts_positions(self) -> bool:
        return True

    def __call__(self, query, key, value, *, causal=True, scale=None, key_mask=None, module=None):
        layer = getattr(module, "layer_idx", 0) or 0
        return bigbird_attention(query, key, value, self.block, window_blocks=self.window_blocks,
                                 global_blocks=self.global_blocks, random_blocks=self.random_blocks,
                                 seed=hash((self.seed, layer)), causal=causal, scale=scale, key_mask=key_mask)
