"""A key-value cache for decoding that grows in place.

transformers' ``DynamicCache`` appends a decoded token's keys and values with ``torch.cat``, which
copies the whole cache of every layer at every token: the copy grows with the context (the sparse
sample model decoded 1.11x / 1.26x faster without it after prompts of 1024 / 2048 tokens, Zen 3;
``benchmarks/bench_decode.py --part context``). Here each
layer's keys and values live in buffers with room to spare (their capacity doubles when full), a
token is written into its slot, and attention reads views of the filled part: the compiled
decode attention reads them where they lie (each token's vector is contiguous).

    model.generate(ids, **cache_argument(model, "growing"), ...)  # or growing_cache(model)
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..errors import SparseLLMError

MIN_CAPACITY = 256  # tokens a layer's buffers hold at first
CACHES = ("dynamic", "growing")  # transformers' DynamicCache; growing_cache


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` whose keys and values are views of buffers longer than them.

    The inherited methods (crop, reordering the batch for beam search) keep working on the views: a
    crop shortens the views, so the next token overwrites the buffers' stale slots; a reordering
    makes new tensors, which the next update copies into new buffers.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        end = length + key_states.shape[-2]
        if not self._views_of_buffers(key_states, end):
            capacity = max(MIN_CAPACITY, 2 * end)
            key_buffer = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[3]))
            value_buffer = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[3]))
            if length:
                key_buffer[:, :, :length], value_buffer[:, :, :length] = self.keys, self.values
            self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.key_buffer[:, :, length:end] = key_states
        self.value_buffer[:, :, length:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def _views_of_buffers(self, key_states: torch.Tensor, end: int) -> bool:
        """Whether the cached keys and values are still the buffers' views, with room up to ``end``."""
        buffer = self.key_buffer
        if buffer is None or end > buffer.shape[2] or buffer.dtype != key_states.dtype:
            return False
        if buffer.shape[:2] != key_states.shape[:2] or buffer.shape[3] != key_states.shape[3]:
            return False
        return self.keys.dim() != 4 or (self.keys.data_ptr() == buffer.data_ptr()
                                        and self.values.data_ptr() == self.value_buffer.data_ptr())


def growing_cache(model: nn.Module) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose full-attention layers are ``GrowingLayer``s.

    Layers of other kinds (sliding windows, which drop old tokens) stay as transformers makes them.
    """
    config = getattr(model, "config", None)
    cache = DynamicCache(config=config)
    if cache.layers:
        cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:
        cache.layer_class_to_replicate = GrowingLayer
    return cache


def cache_argument(model: nn.Module, cache: Cache | str) -> dict[str, Cache]:
    """``cache`` as the keyword argument ``model.generate`` and ``model.forward`` take: a cache, or
    the name of a kind in ``CACHES`` ("dynamic": no argument, transformers makes its own).

    The keyword is ``cache`` in recent transformers 5 releases, ``past_key_values`` (deprecated since) before.
    """
    if isinstance(cache, str):
        if cache not in CACHES:
            raise SparseLLMError(f"unknown cache '{cache}': use one of {', '.join(CACHES)}")
        if cache == "dynamic":
            return {}
        cache = growing_cache(model)
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {keyword: cache}
