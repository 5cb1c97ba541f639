"""Integration on the sample model: a short distilled sparse fine-tune keeps exact sparsity."""

import json

import pytest

import sparsellm
from sparsellm.cli import main

pytestmark = pytest.mark.sample


def test_magnitude_then_distilled_finetune_on_the_sample(sample_folder, tmp_path, capsys):
    out = tmp_path / "smol-ft"
    code = main(["train", "--model", "sample", "--method", "finetune", "--sparsity", "0.6", "--init", "magnitude",
                 "--seqlen", "64", "--batch-size", "2", "--steps", "3", "--lr", "1e-4",
                 "--distill", "--output", str(out), "--threads", "2"])
    assert code == 0
    assert "sparsity 0.6000" in capsys.readouterr().out
    metadata = json.loads((out / "sparsity.json").read_text())
    assert len(metadata["layers"]) == 30 * 7 and metadata["training"]["init"]["method"] == "magnitude"
    weight = sparsellm.load(out, kernels="dense").model.layers[7].mlp.down_proj.weight
    assert (weight == 0).sum().item() == round(0.6 * weight.numel())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(0 < record["kl_loss"] < 10 for record in records)
