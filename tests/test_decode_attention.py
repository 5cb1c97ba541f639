"""Decoding's compiled attention against a float64 reference, and in whole models of five families."""

import pytest
import torch

from sparsellm import attention
from sparsellm.kernels import backend, use_kernels
from sparsellm.kernels.attention import IMPLEMENTATION
from sparsellm.models import load_model

pytestmark = pytest.mark.skipif(backend.extension() is None, reason="the kernels' extension did not build")


def reference(query, key, value, scale):
    groups = query.shape[1] // key.shape[1]
    key, value = (t.double().repeat_interleave(groups, 1) for t in (key, value))
    weights = (query.double() @ key.transpose(-1, -2) * scale).softmax(-1)
    return (weights @ value).transpose(1, 2)  # (batch, 1, heads, dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,heads,kv_heads,length,dim", [(1, 9, 3, 1, 64), (2, 8, 2, 37, 16), (1, 4, 4, 5, 12),
                                                             (3, 6, 1, 130, 80), (1, 2, 1, 700, 64)])
def test_equals_reference(dtype, batch, heads, kv_heads, length, dim):
    generator = torch.Generator().manual_seed(length)
    query = torch.randn(batch, heads, 1, dim, generator=generator).to(dtype)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype) for _ in range(2))
    key[..., :3, :] *= 4  # a few keys that dominate the softmax
    scale = dim**-0.5
    got = backend.extension().decode_attention(query, key, value, scale)
    expected = reference(query, key, value, scale)
    assert got.dtype == dtype and got.shape == (batch, 1, heads, dim)
    # float32 inside; a 16-bit output is off by its one rounding at most (plus float32 noise)
    rounding = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert ((got.double() - expected).abs() <= rounding * expected.abs() + 1e-6).all()


def test_keys_and_values_not_contiguous():
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 2, 64, 32, generator=generator)  # slices of a preallocated cache
    query = torch.randn(2, 6, 1, 32, generator=generator)
    got = backend.extension().decode_attention(query, cache[:, :, :20], cache[:, :, 20:40], 0.3)
    torch.testing.assert_close(got, reference(query, cache[:, :, :20], cache[:, :, 20:40], 0.3).float())


def test_shapes_that_do_not_fit_are_errors():
    attention = backend.extension().decode_attention
    key = torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="one query token"):
        attention(torch.randn(1, 4, 2, 16), key, key, 1.0)  # two query tokens
    with pytest.raises(RuntimeError, match="one query token"):
        attention(torch.randn(1, 3, 1, 16), key, key, 1.0)  # 3 heads over 2 key heads
    with pytest.raises(RuntimeError, match="one query token"):
        attention(torch.randn(1, 4, 1, 16), key[:, :, :0], key[:, :, :0], 1.0)  # no keys
    with pytest.raises(RuntimeError, match="dtype"):
        attention(torch.randn(1, 4, 1, 16).bfloat16(), key, key, 1.0)


def test_models_generate_the_same_tokens(arch, tiny_folder, monkeypatch):
    model, _ = load_model(tiny_folder)
    prompt = torch.randint(3, 300, (1, 6))

    def generate():
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                  attention_mask=torch.ones_like(prompt), pad_token_id=0)

    expected = generate()
    sdpa = model.config._attn_implementation == "sdpa"
    kernel, calls = backend.extension().decode_attention, []
    monkeypatch.setattr(backend.extension(), "decode_attention", lambda *args: calls.append(1) or kernel(*args))
    assert use_kernels(model, "sparse", dense_layers=True).decode_attention == sdpa
    assert torch.equal(generate(), expected)
    # every layer of every decoded token but the last; Gemma 3's sliding layers mask keys (its cache
    # keeps them all here) and go to transformers' SDPA once the window is full
    assert len(calls) >= (23 if sdpa else 0) and (len(calls) > 0) == sdpa


def test_sparse_attention_switches_and_comes_back(llama_folder):
    model, _ = load_model(llama_folder)
    use_kernels(model, "sparse", dense_layers=True)
    assert attention.current(model) is None  # the decode kernel is not a sparse attention method
    attention.apply(model, "window", window=4)
    assert attention.current(model).name == "window"
    attention.apply(model, "sdpa")
    assert model.config._attn_implementation == IMPLEMENTATION and attention.current(model) is None
