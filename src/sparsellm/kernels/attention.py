"""Decoding's attention in compiled calls, for models that compute attention with torch's SDPA.

A decoded token's query attends to every cached key (no mask): the kernel computes softmax(scale
q k^T) v for it in float32, grouped keys and values read in place. transformers' SDPA path spent
~10 tensor ops a layer on it (glue, the grouped-query reshape, the SDPA call, a transpose), each
~10 us in a decoding model. Everything else (prompts, masks, soft-capping, attention sinks) goes
to transformers' own SDPA function, under the mask rules of ``sdpa``.

Attention modules of the Llama family's shape (q/k/v/o projections, rotary embedding, no norms of
queries or keys) also get a forward that splits the projections into heads and rotates queries
and keys in one call (``rotary_forward``); it is kept only if the model's logits stay bit for bit
the same on a short prompt, so a family or a transformers version whose attention differs keeps
its own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from . import backend
from .linear import forward_if_same

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


def rotary_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None,
                   **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' Llama attention forward, the split into heads and the rotary embedding in one call.

    The cache comes as ``cache`` or, in earlier transformers 5 releases, ``past_key_values``.
    """
    cos, sin = position_embeddings
    query, key, value = backend.extension().rotary_heads(self.q_proj(hidden_states), self.k_proj(hidden_states),
                                                         self.v_proj(hidden_states), cos, sin, self.head_dim)
    cache = cache if cache is not None else past_key_values
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    output, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                dropout=self.attention_dropout if self.training else 0.0, **kwargs)
    return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def _llama_shaped(module: nn.Module) -> bool:
    projections = all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    state = all(hasattr(module, name) for name in ("head_dim", "layer_idx", "scaling", "config", "attention_dropout"))
    normed = hasattr(module, "q_norm") or hasattr(module, "k_norm")
    return type(module).__name__.endswith("Attention") and projections and state and not normed


def use_rotary_forward(model: nn.Module) -> int:
    """Give ``model``'s Llama-shaped attention modules ``rotary_forward``, in place, if the logits of
    a short prompt stay bit for bit the same; how many modules got it."""
    modules = [module for module in model.modules() if _llama_shaped(module)]
    if not modules or backend.current().name == "torch":
        return 0
    prompt = torch.arange(1, 6).unsqueeze(0)
    same = forward_if_same(model, modules, lambda module: types.MethodType(rotary_forward, module),
                           lambda model: model(input_ids=prompt, use_cache=True).logits)
    return len(modules) if same else 0
