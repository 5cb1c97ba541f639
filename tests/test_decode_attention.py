"""Decoding's compiled attention against a float64 reference and transformers' rotary embedding,
and in whole models of five families."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

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
                                                             (3, 6, 1, 130, 80), (1, 2, 1, 700, 64),
                                                             (2, 8, 2, 1300, 32)])  # chunks of 512 keys merged
def test_equals_reference(dtype, batch, heads, kv_heads, length, dim):
    generator = torch.Generator().manual_seed(length)
    query = torch.randn(batch, heads, 1, dim, generator=generator).to(dtype)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype) for _ in range(2))
    key[..., :3, :] *= 4  # a few keys that dominate the softmax
    scale = dim**-0.5
    got = backend.extension().decode_attention(query, key, value, scale)
    expected = reference(query, key, value, scale)
    assert got.dtype == dtype and got.shape == (batch, 1, heads, dim)
    # float32 inside; a 16-bit output is off by its one rounding at most (plus float32 noise, which
    # grows with the keys summed: 3.9e-6 at 1300 keys)
    rounding = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    noise = 1e-6 * max(1.0, length / 128)
    assert ((got.double() - expected).abs() <= rounding * expected.abs() + noise).all()


def test_threads_do_not_change_results():
    """The keys' chunks follow the length, not the threads: any thread count gives the same bits."""
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 9, 1, 64, generator=generator)
    key, value = (torch.randn(1, 3, 1500, 64, generator=generator) for _ in range(2))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(backend.extension().decode_attention(query, key, value, 0.125))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(result, results[0]) for result in results)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,tokens,heads,kv_heads,dim,cos_batch", [(1, 1, 9, 3, 64, 1), (2, 3, 4, 2, 16, 2),
                                                                      (3, 5, 6, 6, 8, 1), (2, 70, 2, 1, 128, 2)])
def test_rotary_heads_equal_transformers(dtype, batch, tokens, heads, kv_heads, dim, cos_batch):
    generator = torch.Generator().manual_seed(tokens)
    query = (torch.randn(batch, tokens, heads * dim, generator=generator) * 3).to(dtype)
    key, value = (torch.randn(batch, tokens, kv_heads * dim, generator=generator).to(dtype) for _ in range(2))
    angles = torch.rand(cos_batch, tokens, dim // 2, generator=generator).repeat(1, 1, 2) * 40
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    got = backend.extension().rotary_heads(query, key, value, cos, sin, dim)

    def heads_of(t):
        return t.view(batch, tokens, -1, dim).transpose(1, 2)

    expected = (*apply_rotary_pos_emb(heads_of(query), heads_of(key), cos, sin), heads_of(value))
    for name, got_part, expected_part in zip(("query", "key", "value"), got, expected, strict=True):
        assert got_part.is_contiguous() and torch.equal(got_part, expected_part), name  # bit for bit


def test_rotary_heads_shapes_that_do_not_fit_are_errors():
    rotary = backend.extension().rotary_heads
    q, kv, angles = torch.randn(1, 2, 32), torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="shapes do not fit"):
        rotary(q, kv, kv, angles[..., :15], angles[..., :15], 15)  # odd head size
    with pytest.raises(RuntimeError, match="shapes do not fit"):
        rotary(q, kv, kv, angles[:, :1], angles[:, :1], 16)  # angles for one token of two
    with pytest.raises(RuntimeError, match="shapes do not fit"):
        rotary(q[..., :24], kv, kv, angles, angles, 16)  # 24 features are not whole heads
    with pytest.raises(RuntimeError, match="dtype"):
        rotary(q, kv, kv, angles.bfloat16(), angles.bfloat16(), 16)


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
    report = use_kernels(model, "sparse", dense_layers=True)
    assert report.decode_attention == sdpa
    # Llama and Qwen 2 attention take the fused rotary forward, and their layers the direct calls;
    # Gemma 3 normalises queries and keys (q_norm, k_norm), OPT and GPT-2 have other projections
    layers = model.config.num_hidden_layers
    assert report.rotary_attention == report.decode_layers == (layers if arch in ("llama", "qwen2") else 0)
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


def test_a_different_attention_keeps_its_forward(llama_folder):
    class ScaledAttention(LlamaAttention):  # the same modules, another function
        def forward(self, *args, **kwargs):
            output, weights = super().forward(*args, **kwargs)
            return output * 2, weights

    model, _ = load_model(llama_folder)
    for layer in model.model.layers:
        layer.self_attn.__class__ = ScaledAttention
    tokens = torch.randint(3, 300, (1, 7))
    with torch.no_grad():
        expected = model(tokens).logits
        report = use_kernels(model, "sparse", dense_layers=True)
        assert report.decode_attention and report.rotary_attention == 0
        assert not any("forward" in layer.self_attn.__dict__ for layer in model.model.layers)
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-4, atol=1e-4)
