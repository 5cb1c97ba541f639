"""Decoding's attention as one compiled call, for models that compute attention with torch's SDPA.

A decoded token's query attends to every cached key (no mask): the kernel computes softmax(scale
q k^T) v for it in float32, grouped keys and values read in place. transformers' SDPA path spent
~10 tensor ops a layer on it (glue, the grouped-query reshape, the SDPA call, a transpose), each
~10 us in a decoding model. Everything else (prompts, masks, soft-capping, attention sinks) goes
to transformers' own SDPA function, under the mask rules of ``sdpa``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from . import backend

# the model's attn_implementation on the kernels; not under the "sparsellm_" prefix, which
# attention.hf keeps for the sparse attention methods
IMPLEMENTATION = "sparsellm-decode"
_CHANGES_ATTENTION = ("softcap", "s_aux", "position_bias")  # arguments the kernel does not compute


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, H, L, d) tensors in, (B, L, H, d) out."""
    one_token = query.shape[2] == 1 and attention_mask is None and not dropout
    if one_token and all(kwargs.get(name) is None for name in _CHANGES_ATTENTION) and backend.current().name != "torch":
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return backend.extension().decode_attention(query, key, value, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def use_decode_attention(model: nn.Module) -> bool:
    """Switch a model whose attention is ``sdpa`` to ``attention_forward``, in place; whether it was."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or backend.current().name == "torch":
        return False
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(IMPLEMENTATION)
    return True
