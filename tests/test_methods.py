"""The three pruning methods against brute-force or closed-form references on single layers."""

import pytest
import torch

from sparsellm.weights import InputStatistics, Pattern, get_method
from sparsellm.weights.base import HESSIAN, NORMS, add_gram_upper


def correlated_inputs(tokens=4096, features=64, seed=0):
    """Inputs with correlated features and very different scales (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) / features**0.5
    scales = torch.logspace(-1, 1, features)[torch.randperm(features, generator=g)]
    base = torch.randn(tokens, features, generator=g)
    return (base + 0.8 * base @ mixing) * scales


def stats_of(x, needs=frozenset({HESSIAN, NORMS})):
    stats = InputStatistics(x.shape[1], needs)
    for chunk in x.split(1000):
        stats.add_batch(chunk.unsqueeze(0))
    return stats


def output_error(weight, pruned, x):
    return ((x @ (weight - pruned).t()).norm() / (x @ weight.t()).norm()).item()


def test_gram_upper_matches_full_product():
    x = torch.randn(300, 333)
    gram = torch.zeros(333, 333)
    add_gram_upper(gram, x)
    full = torch.triu(gram) + torch.triu(gram, 1).t()
    torch.testing.assert_close(full, x.t() @ x, rtol=1e-4, atol=1e-3)


def test_statistics_match_direct_formulas():
    x = torch.randn(5, 40, 16)
    stats = InputStatistics(16, frozenset({HESSIAN, NORMS}))
    stats.add_batch(x[:2])
    stats.add_batch(x[2:])
    flat = x.reshape(-1, 16)
    assert stats.samples == 5 and stats.tokens == 200
    torch.testing.assert_close(stats.scaled_hessian(), 2 / 5 * flat.t() @ flat, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.input_norms(), (flat.square().sum(0) / 5).sqrt())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_reconstruction_error_ordering(pattern):
    x = correlated_inputs()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    stats = stats_of(x)
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        pruned = get_method(name).prune(weight.clone(), stats, 0.5, Pattern.parse(pattern))
        assert (pruned == 0).sum().item() == weight.numel() // 2
        errors[name] = output_error(weight, pruned, x)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_at_zero_sparsity_leaves_weights_unchanged():
    x = correlated_inputs(features=32)
    weight = torch.randn(8, 32)
    pruned = get_method("sparsegpt").prune(weight.clone(), stats_of(x), 0.0, Pattern())
    torch.testing.assert_close(pruned, weight, rtol=0, atol=1e-5)


def damped(hessian, percdamp=0.01):
    return (hessian + percdamp * hessian.diag().mean() * torch.eye(len(hessian), dtype=hessian.dtype)).double()


@pytest.mark.parametrize("column", [0, 5, 11])
def test_sparsegpt_single_weight_matches_closed_form_obs(column):
    """Pruning one weight w_p: SparseGPT may only move the columns after p, so its update must equal
    the OBS closed form on that column set F = {p, p+1, ...}: delta = -(w_p / [H_F^-1]_pp) [H_F^-1]_:p,
    with H_F the (damped) Hessian restricted to F."""
    x = correlated_inputs(features=12, seed=3)
    stats = stats_of(x, frozenset({HESSIAN}))
    weight = torch.randn(1, 12, generator=torch.Generator().manual_seed(4)) + 3.0
    weight[0, column] = 1e-3  # the unique lowest w^2 / d^2, so this is the weight SparseGPT prunes
    pruned = get_method("sparsegpt").prune(weight.clone(), stats, 1 / 12, Pattern())
    assert pruned[0, column] == 0 and (pruned == 0).sum() == 1

    free = list(range(column, 12))
    inverse = torch.linalg.inv(damped(stats.scaled_hessian())[free][:, free])
    w = weight[0, free].double()
    expected = w - w[0] / inverse[0, 0] * inverse[:, 0]
    torch.testing.assert_close(pruned[0, free].double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pruned[0, :column], weight[0, :column])  # earlier columns untouched


def test_sparsegpt_nm_groups_and_dead_inputs():
    x = correlated_inputs(features=32)
    x[:, 7] = 0  # a dead input: its weights must be zeroed, the Hessian kept invertible
    weight = torch.randn(16, 32) + 0.1
    pruned = get_method("sparsegpt").prune(weight.clone(), stats_of(x), 0.5, Pattern(2, 4))
    assert ((pruned.reshape(16, 8, 4) != 0).sum(-1) <= 2).all()
    assert (pruned[:, 7] == 0).all()
    assert torch.isfinite(pruned).all()


def test_sparsegpt_raises_dampening_when_hessian_is_singular(caplog):
    x = torch.randn(2000, 4) @ torch.randn(4, 16)  # rank 4 of 16: singular without enough dampening
    stats = stats_of(x, frozenset({HESSIAN}))
    method = get_method("sparsegpt", percdamp=1e-12)
    pruned = method.prune(torch.randn(8, 16), stats, 0.5, Pattern())
    assert torch.isfinite(pruned).all()
    assert "retrying with" in caplog.text


def test_magnitude_per_matrix_and_per_row():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    per_matrix = get_method("magnitude").prune(weight.clone(), None, 0.5, Pattern())
    assert torch.equal(per_matrix != 0, torch.tensor([[False] * 4, [True] * 4]))
    per_row = get_method("magnitude", per_row=True).prune(weight.clone(), None, 0.5, Pattern())
    assert torch.equal(per_row != 0, torch.tensor([[False, False, True, True]] * 2))


def test_wanda_scores_weight_times_input_norm():
    x = torch.ones(10, 4) * torch.tensor([100.0, 1.0, 1.0, 1.0])
    weight = torch.tensor([[0.1, 1.0, 2.0, 3.0]])
    pruned = get_method("wanda").prune(weight.clone(), stats_of(x, frozenset({NORMS})), 0.5, Pattern())
    # |W| * ||X||: 0.1*100*sqrt(10)... column 0 outranks column 1 despite its small weight
    assert torch.equal(pruned != 0, torch.tensor([[True, False, False, True]]))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_group_equals_layer_by_layer(pattern):
    """Stacking layers that share H (q/k/v) into one sweep gives each layer its own result."""
    x = correlated_inputs(features=96)
    stats = stats_of(x, frozenset({HESSIAN}))
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(rows, 96, generator=g) for rows in (40, 24, 24)]
    sparsities = [0.5, 0.3, 0.7] if pattern == "unstructured" else [0.5] * 3
    method = get_method("sparsegpt")
    grouped = method.prune_group([w.clone() for w in weights], stats, sparsities, Pattern.parse(pattern))
    for weight, sparsity, together in zip(weights, sparsities, grouped, strict=True):
        alone = method.prune(weight.clone(), stats, sparsity, Pattern.parse(pattern))
        assert torch.equal(alone == 0, together == 0)
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
        assert (alone == 0).sum() == round(sparsity * weight.numel())
