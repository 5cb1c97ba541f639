"""Weight quantization: grids against a brute-force fit, zeros that stay zero, joint SparseGPT and masked GPTQ
against a plain column-by-column OBS reference."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsellm
from sparsellm.errors import SparseLLMError
from sparsellm.models import decoder_blocks, linear_layers, load_model, weight_matrix
from sparsellm.weights.base import HESSIAN, InputStatistics
from sparsellm.weights.gptq import quantize_masked
from sparsellm.weights.masks import Pattern, nm_mask
from sparsellm.weights.quant import LayerQuantizer, QuantScheme, fit_grid, grid_of, quantize_matrix
from sparsellm.weights.sparsegpt import SparseGPT, inverse_hessian_factor


def brute_force_grid(values, keep, scheme):
    """scale, zero of one row-group, written out with Python floats."""
    kept = [v for v, k in zip(values.tolist(), keep.tolist(), strict=True) if k]
    low, high = min([*kept, 0.0]), max([*kept, 0.0])
    half = scheme.levels // 2
    scale = max(-low, high) / (half - 1) if scheme.symmetric else (high - low) / (scheme.levels - 1)
    scale = float(torch.tensor(scale if scale > 0 else 1.0).clamp_min(torch.finfo(torch.float16).tiny).half())
    zero = half if scheme.symmetric else min(max(round(-low / scale), 0), scheme.levels - 1)
    return scale, zero


def on_grid(values, grid, keep):
    """Every kept value is (q - z) * s for an integer code q in range; every other value is exactly 0."""
    scale, zero = grid.expand(values.shape[1])
    codes = values / scale + zero
    integral = (codes - codes.round()).abs() < 1e-3
    in_range = (codes.round() >= 0) & (codes.round() <= grid.scheme.levels - 1)
    return bool((integral & in_range)[keep].all()) and bool((values[~keep] == 0).all())


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.sampled_from([2, 4, 8]), st.sampled_from([0, 4, 16]),
       st.booleans(), st.floats(0.0, 0.9), st.integers(0, 2**31 - 1))
def test_grid_matches_brute_force_and_values_land_on_it(rows, columns, bits, group, symmetric, sparsity, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.05
    keep = torch.rand(rows, columns, generator=generator) >= sparsity
    weight = weight * keep
    scheme = QuantScheme(bits, group, symmetric)
    scale, zero = fit_grid(weight, scheme, keep)
    width = group or columns
    for row, start in itertools.product(range(rows), range(0, columns, width)):
        expected_scale, expected_zero = brute_force_grid(weight[row, start:start + width],
                                                         keep[row, start:start + width], scheme)
        assert float(scale[row, start // width]) == pytest.approx(expected_scale, rel=1e-6)
        assert int(zero[row, start // width]) == expected_zero
    quantized, grid = quantize_matrix(weight, scheme, keep)
    assert on_grid(quantized, grid, keep)
    # round to nearest: no kept weight is further than half a step from its grid value (unless clipped)
    scales, _ = grid.expand(columns)
    assert bool(((quantized - weight).abs() <= scales / 2 + 1e-6)[keep].all()) or not symmetric


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(2, 40), st.sampled_from([2, 4, 8]), st.sampled_from([0, 8]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_mse_observer_picks_the_least_error_clipping(rows, columns, bits, group, symmetric, seed):
    """Each row-group's grid is the best of the 80 shrunk min-max ranges, scored by sum |q - w|^2.4
    over the kept weights, written out one candidate at a time with Python floats."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) ** 3  # heavy tails: clipping pays
    keep = torch.rand(rows, columns, generator=generator) >= 0.3
    weight = weight * keep
    minmax, scheme = QuantScheme(bits, group, symmetric), QuantScheme(bits, group, symmetric, "mse")
    scale, zero = fit_grid(weight, scheme, keep)
    width = group or columns

    def error(values, s, z):
        return sum(abs((min(max(round(v / s) + z, 0), scheme.levels - 1) - z) * s - v) ** 2.4 for v in values)

    for row, start in itertools.product(range(rows), range(0, columns, width)):
        values = weight[row, start:start + width][keep[row, start:start + width]].tolist()
        s, z = float(scale[row, start // width]), int(zero[row, start // width])
        candidates = []
        for step in range(80):
            shrunk = torch.tensor([v * (1 - step / 100) for v in values]).float()
            candidates.append(brute_force_grid(shrunk, torch.ones(len(values), dtype=torch.bool), minmax))
        best = min(error(values, *c) for c in candidates)
        assert (s, z) in candidates and error(values, s, z) == pytest.approx(best, rel=1e-4, abs=1e-9)
        assert error(values, s, z) <= error(values, *candidates[0]) + 1e-9  # never worse than min-max


def test_scheme_checks():
    with pytest.raises(SparseLLMError, match="--bits must be one of"):
        QuantScheme(3)
    with pytest.raises(SparseLLMError, match="--group-size"):
        QuantScheme(4, -1)
    with pytest.raises(SparseLLMError, match="--quant-observer"):
        QuantScheme(4, 128, True, "max")


def reference_sweep(weight, hessian, keep_fn, scheme, percdamp=0.01, fit_keep=None):
    """OBS one column at a time, every update applied at once (no blocks, no lazy batches).

    ``fit_keep(W, U, i, width)`` gives the weights a group's grid is fitted on (default: the mask so far)."""
    W = weight.clone().double()
    U = inverse_hessian_factor(hessian, percdamp).double()
    columns = W.shape[1]
    width = scheme.group_size or columns
    keep = torch.ones_like(W, dtype=torch.bool)
    scale = zero = None
    for i in range(columns):
        keep_fn(W, U, keep, i)
        if i % width == 0:
            counted = keep[:, i:i + width] if fit_keep is None else fit_keep(W, U, i, width)
            scale, zero = fit_grid(W[:, i:i + width].float(), scheme, counted, group_size=width)
        s, z = scale[:, 0].double(), zero[:, 0].double()
        q = ((torch.round(W[:, i] / s) + z).clamp(0, scheme.levels - 1) - z) * s
        q = q.masked_fill(~keep[:, i], 0.0)
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err.unsqueeze(1) * U[i, i:].unsqueeze(0)
        W[:, i] = q
    return W.float(), keep


def random_layer(rows=16, columns=64, tokens=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(columns) + 0.3 * torch.randn(columns, columns, generator=generator)  # correlated inputs
    x = torch.randn(tokens, columns, generator=generator) @ mixing * torch.linspace(0.2, 3, columns)
    weight = torch.randn(rows, columns, generator=generator)
    return weight, 2 * x.t() @ x / tokens, x


def test_joint_sparsegpt_24_matches_a_column_by_column_reference():
    weight, hessian, _ = random_layer()
    scheme = QuantScheme(4, 32, symmetric=False)

    def choose_24(W, U, keep, i):  # SparseGPT's N:M rule: at each group start, on the updated weights
        if i % 4 == 0:
            scores = W[:, i:i + 4].square() / torch.diag(U)[i:i + 4].square()
            keep[:, i:i + 4] = nm_mask(scores, 2, 4)

    def foretold_24(W, U, i, width):  # a group's grid: fitted on the 2:4 masks its current scores give
        scores = W[:, i:i + width].square() / torch.diag(U)[i:i + width].square()
        return nm_mask(scores, 2, 4)

    expected, expected_keep = reference_sweep(weight, hessian, choose_24, scheme, fit_keep=foretold_24)
    quantizer = LayerQuantizer(scheme, *weight.shape)
    result = SparseGPT(blocksize=32).fasterprune(weight.clone(), hessian, [0.5], Pattern(2, 4), quantizer=quantizer)
    keep = result != 0
    assert bool(((result.view(16, -1, 4) != 0).sum(-1) <= 2).all())
    assert on_grid(result, quantizer.grid(), keep)
    assert torch.equal(keep, expected_keep & (expected != 0))
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [0, 16])
def test_masked_gptq_keeps_zeros_and_follows_the_reference(group):
    weight, _, x = random_layer(seed=1)
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(2)) >= 0.6
    pruned = weight * keep
    scheme = QuantScheme(4, group)
    stats = InputStatistics(weight.shape[1], frozenset({HESSIAN}))
    stats.add_batch(x, sequences=1)
    quantizer = LayerQuantizer(scheme, *weight.shape)
    result, = quantize_masked([pruned.clone()], stats, [quantizer])
    assert on_grid(result, quantizer.grid(), keep)
    assert bool((result[~keep] == 0).all())
    expected, _ = reference_sweep(pruned, stats.scaled_hessian(), lambda W, U, k, i: k.copy_(keep), scheme)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)

    # unpruned, it is GPTQ: on correlated inputs it beats round-to-nearest on the layer's output
    quantizer = LayerQuantizer(scheme, *weight.shape)
    gptq, = quantize_masked([weight.clone()], stats, [quantizer], keeps=[torch.ones_like(keep)])
    rounded, _ = quantize_matrix(weight, scheme, torch.ones_like(keep))
    assert ((gptq - weight) @ x.t()).norm() < 0.9 * ((rounded - weight) @ x.t()).norm()


@pytest.mark.parametrize(("method", "pattern", "applied"), [("sparsegpt", "2:4", "joint"),
                                                           ("wanda", "unstructured", "gptq")])
def test_prune_with_quantization(llama_folder, method, pattern, applied):
    model, tokenizer = load_model(llama_folder)
    scheme = QuantScheme(4, 32)
    report = sparsellm.prune(model, tokenizer, method=method, pattern=pattern, sparsity=0.5, nsamples=4,
                             seqlen=64, quantization=scheme)
    assert report.quantization == scheme.to_dict() | {"applied": applied}
    prefix, blocks = decoder_blocks(model)
    for index, block in enumerate(blocks):
        for name, module in linear_layers(block, f"{prefix}.{index}").items():
            weight = weight_matrix(module)
            grid = grid_of(module)
            assert grid is not None and grid.scheme == scheme, name
            assert on_grid(weight, grid, weight != 0), name
            assert (weight == 0).float().mean() >= 0.5, name
