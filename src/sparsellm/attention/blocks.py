"""What the block-sparse methods share: grouped-query heads and softmax attention block by block.

Window and BigBird attention cut the queries into blocks of ``b`` rows and give each block its own
``S`` keys (a slice of the sequence, or gathered blocks). Every block is then one small dense
attention, and all blocks go through ``scaled_dot_product_attention`` in one batched call, so no
``n x n`` matrix ever exists. Blocks whose mask is the same pattern (the interior of the sequence)
pass one shared ``(b, S)`` mask, which keeps PyTorch on its fused CPU kernel; the few blocks at the
edges (sequence start and end, padding) pass a mask per block and take the slower general kernel.

Grouped-query attention (Llama, Qwen, Gemma: fewer key/value heads than query heads) is handled by
stacking the ``G`` query heads that share a key/value head as extra query rows of the same block,
so keys and values are never copied per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SparseLLMError


def check_shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool) -> None:
    """(B, H, Lq, d) queries against (B, Hkv, Lk, d) keys and values, H a multiple of Hkv."""
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise SparseLLMError(
            f"sparse attention takes (batch, heads, length, head_dim) tensors, got query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1] or query.shape[1] % key.shape[1]:
        raise SparseLLMError(
            f"query {tuple(query.shape)} does not match key {tuple(key.shape)}: batch and head_dim must agree and "
            "the query heads must be a multiple of the key/value heads"
        )
    if query.shape[2] > key.shape[2] or (not causal and query.shape[2] != key.shape[2]):
        raise SparseLLMError(
            f"{query.shape[2]} queries against {key.shape[2]} keys: queries must be the last positions of the keys "
            "(and as many as the keys without a causal mask)"
        )


def group_heads(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, L, d) -> (B, Hkv, G, L, d): the G query heads that read each key/value head."""
    return query.unflatten(1, (kv_heads, query.shape[1] // kv_heads))


def gather_rows(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``tensor`` (..., L, d) at ``positions`` (M, S), clamped into range: (..., M, S, d).

    Out-of-range positions read a real row; the caller masks them out.
    """
    flat = positions.clamp(0, tensor.shape[-2] - 1).flatten()
    return tensor.index_select(-2, flat).unflatten(-2, positions.shape)


def attend_blocks(query_blocks: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor,
                  mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Softmax attention of every query block to its own keys.

    ``query_blocks`` (B, Hkv, G, M, b, d); ``key_blocks`` and ``value_blocks`` (B, Hkv, M, S, d);
    ``mask`` (True = attend) is ``None``, one (b, S) pattern shared by all blocks (the fast path),
    or one pattern per block, (1 or B, M, b, S). Returns (B, Hkv, G, M, b, d).
    """
    batch, kv_heads, groups, blocks, rows, dim = query_blocks.shape
    keys = key_blocks.shape[-2]
    queries = query_blocks.transpose(2, 3).reshape(batch, kv_heads, blocks, groups * rows, dim)
    if mask is None or mask.dim() == 2:
        shared = None if mask is None else mask.repeat(groups, 1)
        out = F.scaled_dot_product_attention(
            queries.flatten(0, 1), key_blocks.flatten(0, 1), value_blocks.flatten(0, 1), attn_mask=shared, scale=scale
        ).unflatten(0, (batch, kv_heads))
    else:
        per_block = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, blocks, groups * rows, keys)
        out = F.scaled_dot_product_attention(queries, key_blocks, value_blocks, attn_mask=per_block, scale=scale)
    return out.unflatten(3, (groups, rows)).transpose(2, 3)
