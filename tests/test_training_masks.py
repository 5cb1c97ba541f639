"""Masks during training: the cubic schedule, RigL's drop and regrow, ERK, and pruned weights that stay zero."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsellm.errors import SparseLLMError
from sparsellm.training import Sparsifier, make_schedule, prunable_layers
from sparsellm.training.gmp import GradualMagnitude
from sparsellm.training.rigl import drop_and_grow
from sparsellm.training.sparsifier import erk_sparsities
from sparsellm.weights.masks import Pattern, gradual_mask
from tiny import make_model

pytestmark = pytest.mark.usefixtures("single_thread")


def train_steps(model, sparsifier, optimizer, steps, seed=0, on_step=None):
    """Plain training on random tokens, with the sparsifier replacing optimizer.step()."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
        model(input_ids=batch, labels=batch).loss.backward()
        sparsifier.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step()


def zhu_gupta(t, s0, sf, t0, n, dt):
    """The paper's formula, written out: s_t = s_f + (s_0 - s_f)(1 - (t - t_0)/(n dt))^3 at update steps."""
    if t < t0:
        return None  # no pruning yet
    last_update = t0 + min((t - t0) // dt, n) * dt
    return sf + (s0 - sf) * (1 - (last_update - t0) / (n * dt)) ** 3


def test_cubic_schedule_matches_the_formula_at_every_step():
    model = make_model("llama")
    s0, sf, t0, dt, end, steps = 0.1, 0.8, 3, 4, 23, 30
    schedule = make_schedule("gmp", steps, sf, start=t0, end=end, every=dt, initial_sparsity=s0)
    n = (end - t0) // dt
    assert (schedule.start, schedule.every, schedule.updates) == (t0, dt, n)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparsifier = Sparsifier(model, schedule, optimizer)
    layers = prunable_layers(model)
    seen = []

    def check():
        step = sparsifier.step_count - 1  # the step that just ran
        expected = zhu_gupta(step, s0, sf, t0, n, dt)
        for name, module in layers.items():
            zeros = int((module.weight == 0).sum())
            if expected is None:
                assert zeros == 0, (step, name)
            else:
                assert zeros == round(expected * module.weight.numel()), (step, name)
                assert math.isclose(schedule.sparsity_at(step, sf), expected, abs_tol=1e-12)
        seen.append(expected)

    train_steps(model, sparsifier, optimizer, steps, on_step=check)
    assert seen[t0] == pytest.approx(s0) and seen[-1] == pytest.approx(sf)
    assert [u["step"] for u in sparsifier.updates] == [t0 + k * dt for k in range(n + 1)]
    assert len(set(seen[t0:])) == n + 1  # it changes at every update and nowhere else


def test_magnitude_decides_which_weights_go():
    model = make_model("llama")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights do not move: the mask is pure magnitude
    before = {name: module.weight.detach().clone() for name, module in prunable_layers(model).items()}
    sparsifier = Sparsifier(model, make_schedule("gmp", 1, 0.6), optimizer)
    train_steps(model, sparsifier, optimizer, 1)
    for name, module in prunable_layers(model).items():
        pruned = module.weight == 0
        assert before[name].abs()[pruned].max() <= before[name].abs()[~pruned].min()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.sampled_from([(1, 4), (2, 4), (2, 8), (3, 8)]),
       st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_gradual_nm_mask_is_exact_and_converges_to_nm(rows, groups, nm, progress, seed):
    n, m = nm
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    final_sparsity = 1 - n / m
    keep = gradual_mask(scores, progress * final_sparsity, Pattern(n, m))
    assert (~keep).sum() == round(progress * final_sparsity * scores.numel())
    assert ((keep.reshape(rows, groups, m).sum(-1)) >= n).all()  # never more than M-N gone in a group
    full = gradual_mask(scores, final_sparsity, Pattern(n, m))
    grouped, kept = scores.reshape(rows, groups, m), full.reshape(rows, groups, m)
    brute = grouped >= grouped.topk(n, dim=-1).values[..., -1:]
    assert torch.equal(kept, brute)


def test_drop_and_grow_hand_built():
    weight = torch.tensor([[0.9, -0.1, 0.0, 0.5],
                           [0.0, 0.3, -0.7, 0.0]])
    mask = weight != 0  # 5 active
    gradient = torch.tensor([[0.0, 0.0, 0.4, 0.0],
                             [-2.0, 0.1, 0.0, 0.3]])
    new = drop_and_grow(weight, gradient, mask, 2)
    # drop the two smallest |W| among active: -0.1 at (0,1) and 0.3 at (1,1);
    # grow the two largest |grad| among inactive after the drop: -2.0 at (1,0) and 0.4 at (0,2).
    expected = torch.tensor([[True, False, True, True],
                             [True, False, True, False]])
    assert torch.equal(new, expected)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(2, 12), st.floats(0.1, 0.9), st.floats(0.0, 0.9), st.integers(0, 2**31 - 1))
def test_drop_and_grow_against_brute_force(rows, cols, density, fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    gradient = torch.randn(rows, cols, generator=generator)
    mask = torch.rand(rows, cols, generator=generator) < density
    weight[~mask] = 0
    count = round(fraction * int(mask.sum()))
    new = drop_and_grow(weight, gradient, mask, count)
    assert int(new.sum()) == int(mask.sum())
    # brute force: sort in Python
    active = sorted((abs(weight[i, j].item()), i, j) for i in range(rows) for j in range(cols) if mask[i, j])
    dropped = {(i, j) for _, i, j in active[:count]}
    candidates = sorted(((abs(gradient[i, j].item()), i, j) for i in range(rows) for j in range(cols)
                         if not mask[i, j] or (i, j) in dropped), reverse=True)
    grown = {(i, j) for _, i, j in candidates[:count]}
    expected = {(i, j) for _, i, j in active[count:]} | grown
    assert {(i, j) for i, j in new.nonzero().tolist()} == expected


def test_rigl_keeps_exact_counts_and_regrows_at_zero_with_fresh_state():
    model = make_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    schedule = make_schedule("rigl", 40, 0.7, every=3, end=30, drop_fraction=0.5)
    sparsifier = Sparsifier(model, schedule, optimizer)
    layers = prunable_layers(model)
    expected = {name: module.weight.numel() - round(0.7 * module.weight.numel()) for name, module in layers.items()}
    original_update = sparsifier.update_masks
    regrown_total = 0

    def checked_update():
        nonlocal regrown_total
        old = {name: mask.clone() for name, mask in sparsifier.masks.items()}
        gradients = {name: module.weight.grad.clone() for name, module in layers.items()}
        original_update()
        for name, module in layers.items():
            new = sparsifier.masks[name]
            assert int(new.sum()) == expected[name]
            grown = new & ~old[name]
            regrown_total += int(grown.sum())
            assert (module.weight[grown] == 0).all()  # regrown weights start at zero
            for value in optimizer.state[module.weight].values():
                if value.shape == module.weight.shape:
                    assert (value[~new] == 0).all() and (value[grown] == 0).all()
            if grown.any():  # the regrown ones have the largest |grad| among those not kept
                candidates = gradients[name].abs()[~(old[name] & new)]
                assert gradients[name].abs()[grown].min() >= candidates.topk(int(grown.sum())).values.min()

    sparsifier.update_masks = checked_update
    train_steps(model, sparsifier, optimizer, 40)
    assert len(sparsifier.updates) == len(range(3, 30, 3))
    assert regrown_total > 0
    for name, module in layers.items():
        assert int((module.weight != 0).sum()) <= expected[name]
        assert (module.weight[~sparsifier.masks[name]] == 0).all()


@pytest.mark.parametrize("method", ["gmp", "rigl", "finetune"])
def test_pruned_weights_stay_exactly_zero_under_adam_and_weight_decay(method):
    model = make_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):  # dense steps first, so every weight has large Adam moments before it is pruned
        batch = torch.randint(0, 320, (2, 16), generator=generator)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if method == "finetune":
        with torch.no_grad():
            for module in prunable_layers(model).values():
                module.weight.mul_(torch.rand(module.weight.shape, generator=generator) > 0.6)
    before = {name: module.weight.detach().clone() for name, module in prunable_layers(model).items()}
    options = {} if method == "finetune" else {"every": 10, "end": 80}
    sparsifier = Sparsifier(model, make_schedule(method, 120, 0.6, **options), optimizer)
    train_steps(model, sparsifier, optimizer, 120, seed=2)
    for name, module in prunable_layers(model).items():
        mask = sparsifier.masks[name]
        assert torch.equal(module.weight[~mask], torch.zeros(int((~mask).sum())))
        assert (module.weight[mask] != before[name][mask]).float().mean() > 0.9  # the others did train
        for value in optimizer.state[module.weight].values():
            if value.shape == mask.shape:
                assert (value[~mask] == 0).all()
    assert sparsifier.sparsity() == pytest.approx(0.6, abs=1e-3 if method != "finetune" else 0.02)


def test_conv1d_layout_and_nm_on_gpt2():
    model = make_model("gpt2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparsifier = Sparsifier(model, make_schedule("gmp", 12, None, "2:4", end=8, every=2), optimizer)
    train_steps(model, sparsifier, optimizer, 12)
    for module in prunable_layers(model).values():
        matrix = module.weight.t()  # Conv1D stores (in, out); N:M groups run along the inputs
        groups = (matrix != 0).reshape(matrix.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all()


def test_erk_allocation():
    shapes = {"small": (8, 8), "wide": (64, 256), "big": (256, 256)}
    sparsities = erk_sparsities(shapes, 0.8)
    total = sum(r * c for r, c in shapes.values())
    kept = sum((1 - sparsities[name]) * r * c for name, (r, c) in shapes.items())
    assert kept == pytest.approx(0.2 * total)
    assert sparsities["small"] == 0.0  # its ER density would exceed 1: kept dense
    density = {name: 1 - sparsities[name] for name in ("wide", "big")}
    raw = {name: (r + c) / (r * c) for name, (r, c) in shapes.items()}
    assert density["wide"] / density["big"] == pytest.approx(raw["wide"] / raw["big"])


def test_schedule_errors():
    with pytest.raises(SparseLLMError, match="unstructured"):
        make_schedule("rigl", 10, None, "2:4")
    with pytest.raises(SparseLLMError, match="needs a target sparsity"):
        make_schedule("gmp", 10, None)
    with pytest.raises(SparseLLMError, match="unknown training method"):
        make_schedule("lottery", 10, 0.5)
    with pytest.raises(SparseLLMError, match="within the 10 steps"):
        make_schedule("gmp", 10, 0.5, end=12)
    with pytest.raises(SparseLLMError, match="has none"):
        Sparsifier(make_model("llama"), make_schedule("finetune", 10, None))
    assert isinstance(make_schedule("gmp", 10, 0.5), GradualMagnitude)
