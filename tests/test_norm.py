"""The fused RMS norm against transformers' modules, and which norms ``use_kernels`` swaps."""

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from sparsellm.kernels import backend, use_kernels
from sparsellm.kernels.norm import RMSNorm, fused_norm, tolerance
from sparsellm.models import load_model

pytestmark = pytest.mark.skipif(backend.extension() is None, reason="the kernels' extension did not build")


def hf_norm(cls, width, dtype, eps=1e-5, seed=0):
    norm = cls(width, eps=eps)
    norm.weight.data = torch.randn(width, generator=torch.Generator().manual_seed(seed)) * 0.5 + 1.0
    return norm.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 100), (2, 33), (5, 1, 8), (4, 2, 9)])
def test_equals_transformers_llama_norm(dtype, shape):
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=generator) * 4).to(dtype)
    x[0, ..., 0] = 0  # a zero input and, below, a zero row: rsqrt(eps) scales it, nothing is NaN
    if shape[0] > 1:
        x[1] = 0
    reference = hf_norm(LlamaRMSNorm, shape[-1], dtype, eps=1e-6)
    norm = RMSNorm(reference.weight, reference.variance_epsilon)
    expected, got = reference(x), norm(x)
    assert got.dtype == dtype and got.shape == x.shape
    assert ((got.float() - expected.float()).abs() <= tolerance(expected)).all()
    if dtype != torch.float32:  # 16-bit outputs nearly all bit for bit
        assert (got == expected).float().mean() > 0.99


def test_non_contiguous_input_and_threads():
    x = torch.randn(600, 64, 2).bfloat16()[..., 0]  # 600 rows, not contiguous: split over threads
    reference = hf_norm(LlamaRMSNorm, 64, torch.bfloat16)
    expected = reference(x)
    assert ((RMSNorm(reference.weight, 1e-5)(x).float() - expected.float()).abs() <= tolerance(expected)).all()


def test_mismatched_input_is_an_error():
    norm = RMSNorm(torch.ones(16), 1e-5)
    with pytest.raises(RuntimeError, match="last dimension"):
        norm(torch.randn(2, 15))
    with pytest.raises(RuntimeError, match="dtype"):
        norm(torch.randn(2, 16).bfloat16())


def test_only_norms_with_the_same_function_are_fused():
    for cls in (LlamaRMSNorm, Qwen2RMSNorm):
        assert isinstance(fused_norm(hf_norm(cls, 48, torch.bfloat16)), RMSNorm)
    assert fused_norm(hf_norm(Gemma3RMSNorm, 48, torch.bfloat16)) is None  # weight enters as 1 + weight
    assert fused_norm(torch.nn.LayerNorm(48)) is None

    class ScaledRMSNorm(LlamaRMSNorm):  # the same attributes, another function
        def forward(self, x):
            return super().forward(x) * 1.02

    assert fused_norm(hf_norm(ScaledRMSNorm, 48, torch.bfloat16)) is None
    wide_eps = hf_norm(LlamaRMSNorm, 48, torch.float32, eps=0.5)
    assert fused_norm(wide_eps).eps == 0.5


def test_use_kernels_fuses_the_norms_and_keeps_the_logits(tiny_folder, arch):
    model, _ = load_model(tiny_folder)
    tokens = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        expected = model(tokens).logits
        norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
        report = use_kernels(model, "sparse", dense_layers=True)
        assert report.fused_norms == (norms if arch in ("llama", "qwen2") else 0)
        assert sum(isinstance(m, RMSNorm) for m in model.modules()) == report.fused_norms
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-4, atol=1e-4)


def test_fuse_false_leaves_norms_and_attention(llama_folder):
    model, _ = load_model(llama_folder)
    report = use_kernels(model, "sparse", dense_layers=True, fuse=False)
    assert report.fused_norms == 0 and not report.decode_attention and report.layers
    assert not any(isinstance(m, RMSNorm) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
