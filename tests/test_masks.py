import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsellm.errors import SparseLLMError
from sparsellm.weights.masks import (
    Pattern,
    nm_mask,
    pattern_mask,
    prune_lowest,
    split_count,
    unstructured_mask,
)

shapes = st.tuples(st.integers(1, 40), st.integers(1, 70))
fractions = st.floats(0.0, 0.99)


@settings(max_examples=60, deadline=None)
@given(shapes, fractions, st.integers(0, 2**31 - 1))
def test_unstructured_matrix_prunes_exact_count_of_lowest(shape, sparsity, seed):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    keep = unstructured_mask(scores, sparsity)
    count = round(sparsity * scores.numel())
    assert (~keep).sum().item() == count
    if 0 < count < scores.numel():  # every pruned score is <= every kept score
        assert scores[~keep].max() <= scores[keep].min()


@settings(max_examples=60, deadline=None)
@given(shapes, fractions, st.integers(0, 2**31 - 1))
def test_unstructured_per_row_counts(shape, sparsity, seed):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    keep = unstructured_mask(scores, sparsity, per_row=True)
    rows, columns = shape
    pruned_per_row = (~keep).sum(1)
    assert pruned_per_row.sum().item() == round(sparsity * rows * columns)
    assert pruned_per_row.max() - pruned_per_row.min() <= 1
    for row in range(rows):
        if 0 < pruned_per_row[row] < columns:
            assert scores[row][~keep[row]].max() <= scores[row][keep[row]].min()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 6), st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_nm_keeps_n_highest_in_every_group(rows, groups, m, seed):
    n = 1 + seed % (m - 1)
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    keep = nm_mask(scores, n, m)
    grouped_keep = keep.reshape(rows, groups, m)
    grouped_scores = scores.reshape(rows, groups, m)
    assert (grouped_keep.sum(-1) == n).all()
    brute = grouped_scores >= grouped_scores.topk(n, dim=-1).values[..., -1:]
    assert torch.equal(grouped_keep, brute)


@settings(max_examples=100, deadline=None)
@given(fractions, st.lists(st.integers(0, 300), min_size=1, max_size=20))
def test_split_count_total_is_exact_and_groups_are_close(fraction, sizes):
    counts = split_count(fraction, sizes)
    assert sum(counts) == round(fraction * sum(sizes))
    for count, size in zip(counts, sizes, strict=True):
        assert 0 <= count <= size
        assert abs(count - fraction * size) <= 1.0 + 1e-9


def test_prune_lowest_zero_and_all():
    scores = torch.rand(3, 5)
    assert prune_lowest(scores, 0).all()
    assert not prune_lowest(scores, 15).any()


def test_pattern_parse_and_errors():
    assert Pattern.parse("2:4") == Pattern(2, 4)
    assert Pattern.parse("unstructured").is_nm is False
    assert Pattern.parse("4:8").sparsity == 0.5
    for bad in ("4:4", "5:4", "0:4", "two:four", "2-4"):
        with pytest.raises(SparseLLMError):
            Pattern.parse(bad)
    with pytest.raises(SparseLLMError, match="not divisible"):
        Pattern(2, 4).check_width(6, "x")
    with pytest.raises(SparseLLMError, match="not divisible"):
        pattern_mask(torch.rand(2, 6), 0.5, Pattern(2, 4))
