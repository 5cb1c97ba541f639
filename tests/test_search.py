"""The perplexity-target search against a brute-force scan of its grid.

A random tiny model's perplexity does not rise with pruning, so the perplexity is replaced by an
oracle that reads the real pruned weights: it grows with their share of zeros.
"""

import json
import math

import pytest

from sparsellm.checkpoint import folder_bytes
from sparsellm.cli import main
from sparsellm.errors import SparseLLMError
from sparsellm.evaluation import Perplexity
from sparsellm.models import decoder_blocks, linear_layers
from sparsellm.weights import search
from sparsellm.weights.search import parse_share, parse_size, sparsest_within
from tiny import make_model, make_tokenizer


def zero_share(model) -> float:
    prefix, blocks = decoder_blocks(model)
    weights = [m.weight for i, b in enumerate(blocks) for m in linear_layers(b, f"{prefix}.{i}").values()]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


def oracle(model, tokenizer, **kwargs) -> Perplexity:
    value = 10.0 * math.exp(2.0 * zero_share(model) ** 2)
    return Perplexity(value, math.log(value), 100, 1, 64, 0.0, False, {"name": "oracle"})


def test_parse_share():
    assert parse_share("5%") == pytest.approx(0.05) and parse_share("0.1") == pytest.approx(0.1)


@pytest.mark.parametrize("final_is_worse", [False, True])
def test_search_finds_the_largest_passing_grid_point(monkeypatch, final_is_worse):
    monkeypatch.setattr(search, "perplexity", oracle)
    if final_is_worse:  # the full method does worse than the search predicted: it must step down
        real_prune = search.prune

        def prune(model, tokenizer, **kwargs):
            report = real_prune(model, tokenizer, **kwargs)
            if kwargs["statistics"] is None and kwargs["sparsity"] > 0.25:
                for block in decoder_blocks(model)[1]:
                    block.mlp.up_proj.weight.data[:, :8] = 0
            return report

        monkeypatch.setattr(search, "prune", prune)
    model, tokenizer = make_model("llama", layers=2), make_tokenizer()
    limit = 0.2  # 10 exp(2 s^2) <= 12 for s <= 0.302
    grid = [round(i * 0.05, 10) for i in range(20)]
    passing = [s for s in grid if 10.0 * math.exp(2.0 * s * s) <= 12.0 + 1e-9]
    result = sparsest_within(model, tokenizer, limit, method="wanda", step=0.05, nsamples=4, seqlen=32)

    expected = passing[-1] - (0.05 if final_is_worse else 0.0)
    assert result.chosen == pytest.approx(expected)
    assert zero_share(model) == pytest.approx(expected, abs=1e-3)  # the model left in place is that one
    searched = [c for c in result.candidates if c.stage == "search"]
    finals = [c for c in result.candidates if c.stage == "final"]
    assert len(searched) <= math.ceil(math.log2(len(grid))) + 1  # bisection, not a sweep
    assert all(c.accepted == (c.perplexity <= 12.0) for c in result.candidates)
    assert [c.sparsity for c in finals] == ([0.3, 0.25] if final_is_worse else [0.3])
    assert finals[-1].accepted and result.report.achieved_sparsity == pytest.approx(expected, abs=1e-3)


def test_parse_size():
    assert parse_size("60MB") == 60_000_000 and parse_size("1.5 GiB") == 3 * 2**29 and parse_size("512") == 512
    with pytest.raises(SparseLLMError, match="as a size"):
        parse_size("big")


@pytest.mark.parametrize("extra", [[], ["--allocation", "owl", "--bits", "8", "--dtype", "bfloat16"]])
def test_size_target_picks_the_least_sparsity_whose_folder_fits(llama_folder, tmp_path, extra):
    common = ["prune", "--model", str(llama_folder), "--method", "magnitude", "--nsamples", "4", "--seqlen", "32",
              *extra]
    dense = tmp_path / "dense"
    assert main([*common, "--sparsity", "0", "--output", str(dense)]) == 0
    limit = int(folder_bytes(dense) * 0.8)
    assert main([*common, "--target-size", str(limit), "--search-step", "0.05", "--output", str(tmp_path / "fit")]) == 0
    metadata = json.loads((tmp_path / "fit" / "sparsity.json").read_text())
    chosen = metadata["size_search"]["chosen"]
    assert folder_bytes(tmp_path / "fit") <= limit and chosen > 0
    assert metadata["achieved_sparsity"] == pytest.approx(chosen, abs=1e-3)
    # brute force: one grid point less sparse does not fit
    less = round(chosen - 0.05, 2)
    assert main([*common, "--sparsity", str(less), "--output", str(tmp_path / "less")]) == 0
    assert folder_bytes(tmp_path / "less") > limit


def test_a_size_target_that_cannot_be_met_leaves_nothing(llama_folder, tmp_path, capsys):
    code = main(["prune", "--model", str(llama_folder), "--method", "magnitude", "--target-size", "10KB",
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "more than 0.0 MB" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
