"""MoEfication of the built-in sample model (SmolLM2-135M-Instruct): exact with all experts, saved and reloaded."""

import pytest
import torch

from sparsellm import checkpoint
from sparsellm.activations.moe import moe_layers, moefy, pack_experts, set_top_k
from sparsellm.evaluation import perplexity
from sparsellm.models import load_model

pytestmark = pytest.mark.sample


def test_moefied_sample_is_dense_with_all_experts_and_reloads(sample_folder, tmp_path):
    model, tokenizer = load_model(sample_folder)
    ids = tokenizer("The quick brown fox jumps over the lazy dog, then", return_tensors="pt").input_ids
    with torch.no_grad():
        dense = model(ids).logits
    dense_ppl = perplexity(model, tokenizer, seqlen=256, max_windows=2).perplexity
    report = moefy(model, tokenizer, num_experts=16, top_k=16, nsamples=8, seqlen=256)
    assert len(report.layers) == 30 and report.moe["expert_size"] == 96
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-3, atol=1e-3)
    set_top_k(model, 8)
    half = perplexity(model, tokenizer, seqlen=256, max_windows=2).perplexity
    folder = checkpoint.save(model, tokenizer, tmp_path / "smol-moe")
    reloaded, _ = load_model(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    pack_experts(model), pack_experts(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # Half the MLP neurons per token costs much quality on this SwiGLU model (routing by the true
    # expert outputs gave about 7x the dense perplexity when measured), but the fitted routers must
    # do far better than routers that ignore which expert holds what (the same weights, experts shuffled).
    generator = torch.Generator().manual_seed(0)
    for layer in moe_layers(model).values():
        order = torch.randperm(layer.moe_config.num_experts, generator=generator)
        layer.router.weight.data = layer.router.weight.data[order]
        layer.router.bias.data = layer.router.bias.data[order]
    shuffled = perplexity(model, tokenizer, seqlen=256, max_windows=2).perplexity
    assert dense_ppl < half < shuffled / 3
