"""Sparse attention kernels against dense softmax attention with the equivalent explicit mask."""

import pytest
import torch

from sparsellm.attention import (
    BigBirdAttention,
    PerformerAttention,
    WindowAttention,
    bigbird_attention,
    draw_projection,
    get_method,
    parse_spec,
    performer_attention,
    window_attention,
)
from sparsellm.attention.bigbird import random_blocks_of
from sparsellm.errors import SparseLLMError


def inputs(batch, heads, kv_heads, n_queries, n_keys, dim=16, seed=0, spread=1.0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, n_queries, dim, generator=generator) * spread
    key = torch.randn(batch, kv_heads, n_keys, dim, generator=generator) * spread
    value = torch.randn(batch, kv_heads, n_keys, dim, generator=generator)
    return query, key, value


def dense_attention(query, key, value, allowed):
    """softmax(q k^T / sqrt(d)) v over the allowed (Lq, Lk) or (B, 1, Lq, Lk) pairs, heads expanded by repetition."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return weights @ value


def query_positions(n_queries, n_keys):
    return torch.arange(n_queries)[:, None] + n_keys - n_queries


def window_mask(n_queries, n_keys, window, causal, sinks=0):
    p, j = query_positions(n_queries, n_keys), torch.arange(n_keys)[None]
    if causal:
        return (j <= p) & ((p - j < window) | (j < sinks))
    return ((p - j).abs() < window) | (j < sinks)


WINDOW_CASES = [  # n_queries, n_keys, window, heads, kv_heads, sinks, block
    (37, 37, 5, 4, 2, 0, None),
    (64, 64, 16, 2, 1, 0, None),
    (64, 64, 16, 6, 3, 0, 4),
    (50, 50, 8, 4, 4, 3, None),
    (40, 40, 100, 2, 2, 0, None),  # window longer than the sequence
    (1, 20, 8, 4, 2, 0, None),  # one decoding step against a cache
    (1, 8, 8, 4, 2, 0, None),  # ... against a sliding cache of window - 1 keys
    (5, 30, 8, 4, 2, 2, None),  # a chunk of queries after a cache, with sinks
    (41, 41, 7, 2, 1, 2, 3),
    (300, 300, 100, 2, 1, 0, None),  # the default block (64) shorter than the window
    (230, 260, 150, 4, 2, 2, None),
]


def with_and_without_causal_mask(cases):
    """Each case causal, and also bidirectional where queries and keys are the same positions."""
    return [(*case, causal) for case in cases for causal in (True, False) if causal or case[0] == case[1]]


@pytest.mark.parametrize(("n_queries", "n_keys", "window", "heads", "kv_heads", "sinks", "block", "causal"),
                         with_and_without_causal_mask(WINDOW_CASES))
def test_window_equals_banded_mask(n_queries, n_keys, window, heads, kv_heads, sinks, block, causal):
    query, key, value = inputs(2, heads, kv_heads, n_queries, n_keys)
    out = window_attention(query, key, value, window, causal=causal, sinks=sinks, block=block)
    expected = dense_attention(query, key, value, window_mask(n_queries, n_keys, window, causal, sinks))
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sinks", [0, 2])
def test_window_with_padding(causal, sinks):
    query, key, value = inputs(2, 4, 2, 30, 30)
    key_mask = torch.ones(2, 30, dtype=torch.bool)
    key_mask[1, :4] = False
    out = window_attention(query, key, value, 6, causal=causal, sinks=sinks, key_mask=key_mask)
    allowed = window_mask(30, 30, 6, causal, sinks) & key_mask[:, None, None, :]
    torch.testing.assert_close(out[:, :, 4:], dense_attention(query, key, value, allowed)[:, :, 4:], atol=2e-6, rtol=1e-5)


def test_window_gradients_match_dense():
    query, key, value = (t.requires_grad_() for t in inputs(1, 2, 1, 24, 24))
    window_attention(query, key, value, 5).square().sum().backward()
    grads = [t.grad.clone() for t in (query, key, value)]
    for t in (query, key, value):
        t.grad = None
    dense_attention(query, key, value, window_mask(24, 24, 5, True)).square().sum().backward()
    for got, expected in zip(grads, (query.grad, key.grad, value.grad), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def bigbird_mask(n_queries, n_keys, block, window_blocks, global_blocks, random_blocks, seed, causal):
    """The block pattern written out token by token, random blocks drawn with the same seed."""
    n_key_blocks = -(-n_keys // block)
    allowed = torch.zeros(n_queries, n_keys, dtype=torch.bool)
    for i, p in enumerate(query_positions(n_queries, n_keys)[:, 0].tolist()):
        qb = p // block
        drawn = set(random_blocks_of(qb, n_key_blocks, window_blocks, global_blocks, random_blocks, causal, seed))
        for j in range(n_keys):
            kb = j // block
            near = qb - window_blocks <= kb <= qb if causal else abs(qb - kb) <= window_blocks
            ok = kb < global_blocks or near or kb in drawn or (not causal and qb < global_blocks)
            allowed[i, j] = ok and (j <= p or not causal)
    return allowed


BIGBIRD_CASES = [  # n_queries, n_keys, block, window_blocks, global_blocks, random_blocks, heads, kv_heads
    (64, 64, 4, 1, 2, 3, 4, 2),
    (61, 61, 4, 1, 2, 3, 4, 4),  # a partial last block
    (96, 96, 8, 2, 1, 2, 2, 1),
    (80, 80, 4, 0, 0, 5, 2, 2),
    (20, 20, 32, 1, 2, 3, 2, 2),  # one block
    (1, 50, 4, 1, 2, 3, 4, 2),  # decoding against a cache
    (7, 50, 4, 1, 2, 3, 4, 2),
]


@pytest.mark.parametrize(("n_queries", "n_keys", "block", "window_blocks", "global_blocks", "random_blocks",
                          "heads", "kv_heads", "causal"), with_and_without_causal_mask(BIGBIRD_CASES))
def test_bigbird_equals_block_mask(n_queries, n_keys, block, window_blocks, global_blocks, random_blocks, heads,
                                   kv_heads, causal):
    query, key, value = inputs(2, heads, kv_heads, n_queries, n_keys)
    out = bigbird_attention(query, key, value, block, window_blocks=window_blocks, global_blocks=global_blocks,
                            random_blocks=random_blocks, seed=11, causal=causal)
    allowed = bigbird_mask(n_queries, n_keys, block, window_blocks, global_blocks, random_blocks, 11, causal)
    torch.testing.assert_close(out, dense_attention(query, key, value, allowed), atol=2e-6, rtol=1e-5)


def test_bigbird_with_padding():
    query, key, value = inputs(2, 4, 2, 64, 64)
    key_mask = torch.ones(2, 64, dtype=torch.bool)
    key_mask[0, :5] = False
    out = bigbird_attention(query, key, value, 8, global_blocks=1, random_blocks=2, seed=3, key_mask=key_mask)
    allowed = bigbird_mask(64, 64, 8, 1, 1, 2, 3, True) & key_mask[:, None, None, :]
    torch.testing.assert_close(out[:, :, 5:], dense_attention(query, key, value, allowed)[:, :, 5:], atol=2e-6,
                               rtol=1e-5)


def test_bigbird_random_blocks_are_seeded_and_disjoint():
    draws = {seed: [random_blocks_of(i, 40, 1, 2, 3, True, seed) for i in range(40)] for seed in (0, 1)}
    assert draws[0] == [random_blocks_of(i, 40, 1, 2, 3, True, 0) for i in range(40)]
    assert draws[0] != draws[1]
    for i, drawn in enumerate(draws[0]):
        assert len(drawn) == min(3, max(0, i - 1 - 2)) and len(set(drawn)) == len(drawn)
        assert all(2 <= j < i - 1 for j in drawn)  # neither global nor in the window, and earlier
    # A block draws the same keys whatever the sequence length (prefill and decoding agree).
    assert random_blocks_of(30, 31, 1, 2, 3, True, 5) == random_blocks_of(30, 400, 1, 2, 3, True, 5)


def favor_features(x, projection):
    """phi(x) = exp(W x - |x|^2 / 2) for x already scaled by d^-1/4."""
    return torch.exp(x @ projection.T - x.square().sum(-1, keepdim=True) / 2)


@pytest.mark.parametrize(("n_queries", "n_keys", "heads", "kv_heads", "chunk"),
                         [(50, 50, 4, 2, 8), (50, 50, 4, 4, 64), (64, 64, 2, 1, 16), (3, 40, 4, 2, 8)])
def test_performer_causal_equals_masked_explicit_sum(n_queries, n_keys, heads, kv_heads, chunk):
    query, key, value = inputs(2, heads, kv_heads, n_queries, n_keys, spread=0.5)
    projection = draw_projection(64, 16, seed=1)
    groups = heads // kv_heads
    root = 16**-0.25
    kernel = favor_features(query * root, projection) @ favor_features(key * root, projection).repeat_interleave(
        groups, 1).transpose(-1, -2)
    for causal in (True, False) if n_queries == n_keys else (True,):
        weights = kernel * (torch.arange(n_keys)[None] <= query_positions(n_queries, n_keys)) if causal else kernel
        expected = weights @ value.repeat_interleave(groups, 1) / weights.sum(-1, keepdim=True)
        out = performer_attention(query, key, value, projection, causal=causal, chunk=chunk)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_performer_error_shrinks_with_more_features():
    query, key, value = inputs(1, 4, 4, 128, 128, dim=32, seed=3, spread=0.6)
    exact = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
    errors = []
    for features in (8, 32, 128, 512):
        runs = [performer_attention(query, key, value, draw_projection(features, 32, seed)) for seed in range(4)]
        errors.append(sum(((out - exact).norm() / exact.norm()).item() for out in runs) / len(runs))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_performer_projection_is_orthogonal_within_blocks():
    projection = draw_projection(40, 16, seed=0).double()
    for start in (0, 16):
        rows = projection[start : start + 16]
        directions = rows / rows.norm(dim=1, keepdim=True)
        torch.testing.assert_close(directions @ directions.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(draw_projection(40, 16, seed=0), draw_projection(40, 16, seed=0))


def test_performer_redraw_in_training_only():
    layer = torch.nn.Linear(1, 1)
    layer.layer_idx = 3
    method = PerformerAttention(features=8, redraw=2)
    layer.eval()
    assert torch.equal(method.projection(16, layer), method.projection(16, layer))
    layer.train()
    draws = [method.projection(16, layer) for _ in range(4)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert not torch.equal(PerformerAttention(8).projection(16, layer), PerformerAttention(8, seed=1).projection(16, layer))


def test_specs_and_bad_options():
    assert parse_spec("window:256") == WindowAttention(window=256)
    assert parse_spec("bigbird:block=64,global=2,random=3") == BigBirdAttention(64, global_blocks=2, random_blocks=3)
    assert parse_spec("performer:features=128") == PerformerAttention(features=128)
    for method in (WindowAttention(300, sinks=4), BigBirdAttention(32, random_blocks=1), PerformerAttention(64, seed=2)):
        assert parse_spec(method.spec()) == method
    for spec, message in [("windw:3", "unknown attention method"), ("window:0", "window must be at least 1"),
                          ("window:x", "not an integer"), ("bigbird:size=3", "has no option size"),
                          ("performer:features=-1", "features must be at least 1")]:
        with pytest.raises(SparseLLMError, match=message):
            parse_spec(spec)
    with pytest.raises(SparseLLMError, match="multiple of the key/value heads"):
        get_method("window")(*inputs(1, 3, 2, 8, 8))
