"""Sparse attention on the built-in sample model (SmolLM2-135M): full-attention equality and generation."""

import pytest
import torch

from sparsellm import attention, load_model

pytestmark = pytest.mark.sample


def test_sample_model_generates_with_each_attention(sample_folder):
    model, tokenizer = load_model(sample_folder)
    ids = tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n" * 3,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        full = model(ids).logits
        attention.apply(model, "window", window=ids.shape[1] + 1)
        torch.testing.assert_close(model(ids).logits, full, atol=2e-4, rtol=1e-4)
        for spec in ("window:16", "bigbird:block=8,global=1,random=1", "performer:features=64"):
            attention.apply(model, spec)
            out = model.generate(ids, max_new_tokens=6, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
            recomputed = model(out.sequences).logits[:, ids.shape[1] - 1 : -1]
            torch.testing.assert_close(torch.stack(out.scores, dim=1), recomputed, atol=2e-3, rtol=1e-3)
        attention.apply(model, "sdpa")
        assert torch.equal(model(ids).logits, full)
