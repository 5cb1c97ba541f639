"""The perplexity-target search against a brute-force scan of its grid.

A random tiny model's perplexity does not rise with pruning, so the perplexity is replaced by an
oracle that reads the real pruned weights: it grows with their share of zeros.
"""

import math

import pytest

from sparsellm.evaluation import Perplexity
from sparsellm.models import decoder_blocks, linear_layers
from sparsellm.weights import search
from sparsellm.weights.search import parse_share, sparsest_within
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
