"""Sparse attention as a drop-in for Hugging Face models, through transformers' attention registry.

Modern transformers modeling files compute attention through ``ALL_ATTENTION_FUNCTIONS`` (the
``AttentionInterface``) keyed by ``config._attn_implementation``, and build masks through
``ALL_MASK_ATTENTION_FUNCTIONS`` under the same key. Importing ``sparsellm.attention`` registers
``sparsellm_window``, ``sparsellm_bigbird`` and ``sparsellm_performer`` in both: the attention
function runs the method, and the mask function passes only the padding of each sequence along
(the methods build their own sparse patterns, so no n x n mask is ever made).

The method's options live in the model config under ``sparse_attention``; ``apply`` sets them and
switches the model. ``from_pretrained(..., attn_implementation="sparsellm_window")`` works too
(with the options of a saved ``sparse_attention``, or the method's defaults).

KV cache: for ``window`` without sinks, ``apply`` sets ``config.sliding_window`` so transformers'
``DynamicCache`` keeps only the last ``window - 1`` keys of each layer (``DynamicSlidingWindowLayer``).
Models that declare their own per-layer types (``config.layer_types``: Gemma 3, Qwen 2) keep their
declared full-attention layers whole, since those types also steer their masks and rotary tables.
The other methods need every key, so ``apply`` makes sure no layer's cache drops any.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from ..errors import SparseLLMError
from ..logging_utils import logger
from .base import METHODS, SparseAttention, get_method, parse_spec

CONFIG_KEY = "sparse_attention"
PREFIX = "sparsellm_"
DENSE = ("sdpa", "eager", "full", None)
UNBOUNDED_WINDOW = 2**31 - 1  # a sliding window no sequence reaches: the cache keeps every key


def implementation_name(method: str) -> str:
    """The ``attn_implementation`` under which a method is registered with transformers."""
    return PREFIX + method


@functools.lru_cache(maxsize=32)
def _method(name: str, options: tuple) -> SparseAttention:
    return get_method(name, **dict(options))


def method_of(config, name: str) -> SparseAttention:
    """The method a model config asks for under the ``attn_implementation`` of ``name``."""
    saved = dict(getattr(config, CONFIG_KEY, None) or {})
    options = saved if saved.pop("method", None) == name else {}
    return _method(name, tuple(sorted(options.items())))


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      *, method_name: str, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, H, L, d) tensors in, (B, L, H, d) out."""
    for unsupported in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise SparseLLMError(f"this model's attention uses {unsupported}, which {method_name} attention does not do")
    key_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 4 or attention_mask.shape[-2] != 1 or attention_mask.dtype != torch.bool:
            raise SparseLLMError(
                f"{method_name} attention got a full {tuple(attention_mask.shape)} attention mask; it takes padding "
                "masks only (custom 4-D masks and packed sequences are not supported)"
            )
        key_mask = attention_mask[:, 0, 0]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    method = method_of(module.config, method_name)
    if key_mask is not None and method.counts_positions:
        out = per_sequence(method, query, key, value, key_mask, causal=causal, scale=scaling, module=module)
    else:
        out = method(query, key, value, causal=causal, scale=scaling, key_mask=key_mask, module=module)
    return out.transpose(1, 2).contiguous(), None


def per_sequence(method: SparseAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 key_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run each sequence of a left-padded batch from its first real token.

    Batched generation pads prompts on the left; a method whose pattern counts positions (sinks,
    BigBird's block grid) must count them from each sequence's own first token to give the same
    result as that sequence alone. Queries on padding get zeros.
    """
    outputs = []
    past = key.shape[2] - query.shape[2]
    for row in range(query.shape[0]):
        first = int(key_mask[row].int().argmax())
        skipped = max(0, first - past)
        mask = key_mask[row : row + 1, first:]
        out = method(query[row : row + 1, :, skipped:], key[row : row + 1, :, first:], value[row : row + 1, :, first:],
                     key_mask=None if bool(mask.all()) else mask, **kwargs)
        outputs.append(torch.nn.functional.pad(out, (0, 0, skipped, 0)))
    return torch.cat(outputs)


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask function: (B, 1, 1, kv_length) True where a key is a real token, or None without padding."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset : kv_offset + kv_length].bool()
    if mask.shape[-1] < kv_length:  # keys beyond the 2-D mask (static caches) are real
        mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[-1]), value=True)
    return None if bool(mask.all()) else mask[:, None, None, :]


def register_all() -> None:
    """Register every method with transformers' attention and mask registries (idempotent)."""
    for name in METHODS:
        AttentionInterface.register(implementation_name(name), functools.partial(attention_forward, method_name=name))
        ALL_MASK_ATTENTION_FUNCTIONS.register(implementation_name(name), padding_mask)


def apply(model: torch.nn.Module, method: str | SparseAttention | None = "window", **options) -> SparseAttention | None:
    """Switch every attention layer of an HF model to a sparse method, in place.

    ``method`` is a name with ``options`` (``apply(model, "window", window=256)``), a spec string
    (``"bigbird:block=64,global=2"``), a ``SparseAttention``, or ``"sdpa"``/``"full"``/``None`` to
    go back to the attention the model had. Returns the method now in use. Save a model only after
    going back: the switch edits the in-memory config (``sliding_window``, ``sparse_attention``).
    """
    if method in DENSE:
        restore(model)
        return None
    if isinstance(method, SparseAttention):
        chosen = method
    elif ":" in method:
        if options:
            raise SparseLLMError("give the options either in the spec string or as keyword arguments, not both")
        chosen = parse_spec(method)
    else:
        chosen = get_method(method, **options)
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        raise SparseLLMError(
            f"{type(model).__name__} does not compute attention through transformers' AttentionInterface, "
            "so its attention cannot be switched"
        )
    config = model.config.get_text_config(decoder=True)
    if not hasattr(model, "_sparsellm_dense"):
        model._sparsellm_dense = {"attn_implementation": model.config._attn_implementation,
                                  "sliding_window": getattr(config, "sliding_window", None),
                                  CONFIG_KEY: getattr(config, CONFIG_KEY, None)}
    setattr(config, CONFIG_KEY, {"method": chosen.name, **chosen.options()})
    config.sliding_window = _cache_window(config, chosen, model._sparsellm_dense["sliding_window"])
    model.set_attn_implementation(implementation_name(chosen.name))
    logger.info("attention: %s on %s", chosen.spec(), type(model).__name__)
    return chosen


def restore(model: torch.nn.Module) -> None:
    """Undo ``apply``: the attention, sliding window and config the model had before."""
    dense = getattr(model, "_sparsellm_dense", None)
    if dense is None:
        return
    config = model.config.get_text_config(decoder=True)
    config.sliding_window = dense["sliding_window"]
    if dense[CONFIG_KEY] is None:
        delattr(config, CONFIG_KEY)
    else:
        setattr(config, CONFIG_KEY, dense[CONFIG_KEY])
    model.set_attn_implementation(dense["attn_implementation"])
    del model._sparsellm_dense


def compare(model: torch.nn.Module, tokenizer, method: str | SparseAttention, **perplexity_options) -> dict:
    """Perplexity with the model's own attention and with ``method``, on the same windows.

    ``perplexity_options`` go to ``sparsellm.perplexity`` (data, seqlen, max_windows, batch_size).
    Returns ``{"attention": spec, "full": Perplexity, "sparse": Perplexity}``; the model is left
    as it was.
    """
    from ..evaluation import perplexity

    previous = current(model)
    restore(model)
    try:
        full = perplexity(model, tokenizer, **perplexity_options)
        chosen = apply(model, method)
        sparse = perplexity(model, tokenizer, **perplexity_options)
    finally:
        apply(model, previous)
    return {"attention": chosen.spec(), "full": full, "sparse": sparse}


def current(model: torch.nn.Module) -> SparseAttention | None:
    """The sparse method a model computes attention with, or None."""
    name = model.config._attn_implementation or ""
    if not name.startswith(PREFIX):
        return None
    return method_of(model.config.get_text_config(decoder=True), name.removeprefix(PREFIX))


def _cache_window(config, method: SparseAttention, original: int | None) -> int | None:
    """The ``sliding_window`` that makes transformers' cache keep what the method needs."""
    if method.cache_window is not None:
        return method.cache_window
    if getattr(config, "layer_types", None) is not None and original is not None:
        return UNBOUNDED_WINDOW  # the model's sliding layers must keep every key now
    return None
