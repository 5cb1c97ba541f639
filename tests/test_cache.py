"""The growing KV cache (kernels/cache.py) against transformers' DynamicCache."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import sparsellm
from sparsellm.cli import main
from sparsellm.errors import SparseLLMError
from sparsellm.kernels import GrowingLayer, cache_argument, growing_cache, load
from sparsellm.kernels.cache import CACHES, MIN_CAPACITY
from sparsellm.models import load_model


def _states(generator, batch, tokens):
    return [torch.randn(batch, 2, tokens, 4, generator=generator) for _ in range(2)]


def test_growing_layer_holds_what_dynamic_layer_holds():
    generator = torch.Generator().manual_seed(0)
    growing, reference = GrowingLayer(), DynamicLayer()

    def update(batch, tokens):
        keys, values = _states(generator, batch, tokens)
        got = growing.update(keys, values)
        expected = reference.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        assert growing.get_seq_length() == reference.get_seq_length()

    update(1, 5)  # a prompt
    buffer = growing.key_buffer.data_ptr()
    for _ in range(MIN_CAPACITY - 5):  # decoded tokens up to the first capacity: written in place
        update(1, 1)
    assert growing.key_buffer.data_ptr() == buffer and growing.keys.data_ptr() == buffer
    update(1, 1)  # one more: the buffers grow, their contents copied
    assert growing.key_buffer.shape[2] == 2 * (MIN_CAPACITY + 1) and growing.key_buffer.data_ptr() != buffer
    for layer in (growing, reference):
        layer.crop(-7)
    update(1, 3)  # overwrites the cropped slots
    for layer in (growing, reference):
        layer.batch_repeat_interleave(2)  # new tensors: copied into new buffers at the next update
    update(2, 1)
    for layer in (growing, reference):
        layer.batch_select_indices(torch.tensor([1]))
    update(1, 2)
    for layer in (growing, reference):
        layer.reset()
    update(1, 4)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_generation_equal_with_growing_cache(tiny_folder, arch):
    """Greedy generation past gemma3's sliding window (16 tokens), whose sliding layers stay transformers'."""
    model = load_model(tiny_folder)[0]
    prompt = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(0))
    cache = growing_cache(model)
    kinds = {type(layer).__name__ for layer in cache.layers} or {cache.layer_class_to_replicate.__name__}
    assert "GrowingLayer" in kinds and (arch != "gemma3" or "DynamicSlidingWindowLayer" in kinds)
    options = {"max_new_tokens": 40, "min_new_tokens": 40, "do_sample": False, "pad_token_id": 2,
               "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        expected = model.generate(prompt, **options)
        got = model.generate(prompt, **cache_argument(model, cache), **options)
    assert torch.equal(got, expected)


def test_kernels_decode_from_the_growing_cache(llama_folder, tmp_path, capsys):
    """The compiled decode attention reads the cache's views in place; the CLI's --cache choices agree."""
    model, tokenizer = load_model(llama_folder)
    sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5)
    folder = sparsellm.save(model, tokenizer, tmp_path / "pruned")
    prompt = tokenizer("def main():", return_tensors="pt").input_ids
    options = {"max_new_tokens": 32, "min_new_tokens": 32, "do_sample": False, "pad_token_id": 2,
               "attention_mask": torch.ones_like(prompt)}
    sparse = load(folder, kernels="sparse")
    with torch.no_grad():
        expected = load(folder, kernels="dense").generate(prompt, **options)
        assert torch.equal(sparse.generate(prompt, **cache_argument(sparse, growing_cache(sparse)), **options), expected)
    texts = []
    for cache in CACHES:
        assert main(["generate", str(folder), "--prompt", "def main():", "--max-new-tokens", "12",
                     "--cache", cache]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("def main():")
    with pytest.raises(SparseLLMError, match="unknown cache 'static'"):
        cache_argument(sparse, "static")
