"""A decoded token through a Llama-shaped decoder layer in direct calls.

transformers' decoder layer reaches the kernels through a dozen module calls, two decorators and
the attention interface's lookup for every token; on the kernels that Python was most of what a
decoded token spent outside its linear layers (~180 us a layer: 27 % of the sparse sample's token,
5.4 of 20.4 ms, Zen 3). ``DirectDecode``, a layer's forward, runs the same computations in the
same order, calling the modules' ``forward`` directly, for a token without a mask; anything else
(prompts, masks, training, hooks on the layer's modules, another attention function) goes to the
layer's own forward. ``use_decode_layers`` installs it only where a short prompt and two decoded
tokens give the same logits bit for bit, as ``attention.use_rotary_forward`` does for attention.
Measured end to end (benchmarks/bench_decode.py, Zen 3): the sample's decode 1.05-1.11x, a model of
TinyLlama's shapes 1.01-1.07x, where 94 % of a token is in the linear layers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..models import decoder_blocks
from . import backend
from .attention import IMPLEMENTATION, attention_forward, rotary_forward
from .cache import cache_argument
from .linear import forward_if_same
from .norm import RMSNorm

_PARTS = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
# what transformers' decoder layers are called with; anything else (output_attentions, say) is
# for their own forward
_ARGUMENTS = {"attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "position_embeddings",
              "cache_position"}


class DirectDecode:
    """A Llama-shaped decoder layer's forward: one token without a mask in direct calls, anything
    else through the layer's own forward. It holds the layer's modules (reaching a submodule through
    ``nn.Module.__getattr__`` cost ~1 us, a dozen a layer for every token)."""

    def __init__(self, layer: nn.Module):
        self.layer, self.attention, self.mlp = layer, layer.self_attn, layer.mlp
        self.input_norm, self.post_attention_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q, self.k, self.v, self.o = (getattr(self.attention, f"{name}_proj") for name in "qkvo")
        self.gate, self.up, self.down, self.act = self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj, self.mlp.act_fn
        self.modules = (self.input_norm, self.attention, self.q, self.k, self.v, self.o, self.post_attention_norm,
                        self.mlp, self.gate, self.up, self.down, self.act)

    def _direct(self, hidden_states: torch.Tensor, cache, args: tuple, kwargs: dict) -> bool:
        return not (args or cache is None or hidden_states.shape[1] != 1 or kwargs.get("attention_mask") is not None
                    or kwargs.get("position_embeddings") is None or not _ARGUMENTS.issuperset(kwargs)
                    or self.layer.training or self.attention.config._attn_implementation != IMPLEMENTATION
                    or _hooked(self.modules))

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not self._direct(hidden_states, cache, args, kwargs):
            return type(self.layer).forward(self.layer, hidden_states, *args, **kwargs)
        attention = self.attention
        normed = self.input_norm.forward(hidden_states)
        cos, sin = kwargs["position_embeddings"]
        query, key, value = backend.extension().rotary_heads(self.q.forward(normed), self.k.forward(normed),
                                                             self.v.forward(normed), cos, sin, attention.head_dim)
        key, value = cache.update(key, value, attention.layer_idx)
        output, _ = attention_forward(attention, query, key, value, None, scaling=attention.scaling)
        hidden_states = hidden_states + self.o.forward(output.reshape(*hidden_states.shape[:-1], -1).contiguous())
        normed = self.post_attention_norm.forward(hidden_states)
        return hidden_states + self.down.forward(self.act.forward(self.gate.forward(normed)) * self.up.forward(normed))


def _hooked(modules: tuple[nn.Module, ...]) -> bool:
    """Whether calling these modules' ``forward`` directly would skip a forward hook (torch keeps
    the global ones, ``register_module_forward_hook``'s, in module-level dicts with no accessor)."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(module._forward_hooks or module._forward_pre_hooks for module in modules)


def _fits(layer: nn.Module) -> bool:
    """A decoder layer of the Llama family's shape whose norms and attention are on the kernels."""
    if {name for name, _ in layer.named_children()} != _PARTS:
        return False
    attention, mlp = layer.self_attn, layer.mlp
    forward = attention.__dict__.get("forward")
    return (isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.post_attention_layernorm, RMSNorm)
            and getattr(forward, "__func__", None) is rotary_forward
            and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")))


def _decoded_logits(model: nn.Module, tokens: int = 2) -> torch.Tensor:
    """The last logits of a 5-token prompt and of ``tokens`` greedily decoded tokens after it."""
    argument = cache_argument(model, "growing")
    step, logits = torch.arange(1, 6).unsqueeze(0), []
    for _ in range(tokens + 1):
        last = model(input_ids=step, use_cache=True, **argument).logits[:, -1]
        logits.append(last)
        step = last.argmax(-1, keepdim=True)
    return torch.cat(logits)


def use_decode_layers(model: nn.Module) -> int:
    """Give ``model``'s Llama-shaped decoder layers a ``DirectDecode`` forward, in place, if the logits of a
    short prompt and two decoded tokens stay bit for bit the same; how many layers got it."""
    if backend.current().name == "torch":
        return 0
    layers = [layer for layer in decoder_blocks(model)[1] if _fits(layer)]
    if not layers:
        return 0
    return len(layers) if forward_if_same(model, layers, DirectDecode, _decoded_logits) else 0
