"""The sample model (SmolLM2-135M): SparseGPT 2:4 + 4-bit, compact save, reload, the same logits."""

import json

import pytest
import torch

import sparsellm

pytestmark = pytest.mark.sample


def test_sample_24_4bit_compact_round_trip(sample_folder, tmp_path):
    model, tokenizer = sparsellm.load_model(sample_folder)
    # the first two blocks keep the test short; their layers cover every shape of the model
    report = sparsellm.prune(model, tokenizer, method="sparsegpt", pattern="2:4", nsamples=2, seqlen=64,
                             ignore=[r"layers\.([2-9]|[1-9]\d)\."], quantization=sparsellm.QuantScheme(4, 128))
    assert len(report.layers) == 2 * 7
    tokens = torch.tensor([tokenizer("def main():\n    return 0\n")["input_ids"]])
    expected = model(tokens).logits
    folder = sparsellm.save(model, tokenizer, tmp_path / "smol-24-4bit", report.to_dict())
    reloaded = sparsellm.load(folder)
    assert torch.equal(reloaded(tokens).logits, expected)

    layers = json.loads((folder / "compact.json").read_text())["layers"]
    packed = [entry for entry in layers.values() if entry["quantization"]]
    assert len(packed) == 14 and all(entry["layout"] == "sparse-nm" for entry in packed)
    ratio = sum(e["bytes"] for e in packed) / sum(e["shape"][0] * e["shape"][1] * 2 for e in packed)
    assert ratio <= 0.18
