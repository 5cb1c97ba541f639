"""The sample model (SmolLM2-135M) pruned, then generating on the sparse kernels exactly as densely."""

import pytest
import torch

import sparsellm
from sparsellm.kernels import SparseLinear, load
from sparsellm.kernels.decoder import DirectDecode
from sparsellm.models import load_model

pytestmark = pytest.mark.sample


def test_greedy_generation_on_kernels_equals_dense(sample_folder, tmp_path):
    model, tokenizer = load_model(sample_folder)
    sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5)
    folder = sparsellm.save(model, tokenizer, tmp_path / "smol-50")
    prompt = tokenizer("The Python interpreter reads", return_tensors="pt").input_ids
    outputs = {}
    for kernels in ("dense", "sparse"):
        loaded = load(folder, kernels=kernels)
        layers = [m for m in loaded.modules() if isinstance(m, SparseLinear)]
        assert len(layers) == (30 * 7 if kernels == "sparse" else 0)
        direct = [isinstance(block.__dict__.get("forward"), DirectDecode) for block in loaded.model.layers]
        assert direct == [kernels == "sparse"] * 30
        with torch.no_grad():
            outputs[kernels] = loaded.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                               attention_mask=torch.ones_like(prompt),
                                               pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(outputs["sparse"], outputs["dense"])
