"""Allocation strategies against hand computations, reference computations and brute force."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsellm
from sparsellm import engine
from sparsellm.data import load_text, token_windows
from sparsellm.errors import SparseLLMError
from sparsellm.models import decoder_blocks, linear_layers, weight_matrix
from sparsellm.weights.allocation import LayerSlot, get_allocation, realize
from sparsellm.weights.allocation.owl import outlier_ratio, owl_sparsities
from sparsellm.weights.allocation.sensitivity import fit_exponential, solve_exponential
from sparsellm.weights.masks import Pattern, apportion
from tiny import ARCHITECTURES, make_model, make_tokenizer


def calibration(tokenizer, count=8, seqlen=64):
    return token_windows(tokenizer, load_text("builtin", "calibration"), seqlen, count)


def test_owl_formula_matches_a_hand_computation():
    # D = [1, 2, 4, 3]: D' = (D - 1) / 3 * 0.16 = [0, 0.05333, 0.16, 0.10667], mean 0.08,
    # S_l = 1 - (D'_l - 0.08 + 0.3)
    got = owl_sparsities([1.0, 2.0, 4.0, 3.0], target=0.7, lam=0.08)
    assert got == pytest.approx([0.78, 0.78 - 0.16 / 3, 0.62, 0.78 - 0.32 / 3], abs=1e-12)
    assert sum(got) / 4 == pytest.approx(0.7, abs=1e-12)
    assert owl_sparsities([2.0, 2.0], 0.5, 0.08) == [0.5, 0.5]


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    # 90 scores of 1 and 10 of 20: mean 2.9, threshold 5 x 2.9 = 14.5, so the 10 are outliers: 10 %
    scores = [torch.ones(9, 10), torch.full((2, 5), 20.0)]
    assert outlier_ratio(scores, 5.0) == pytest.approx(10.0)
    assert outlier_ratio(scores, 7.0) == 0.0  # threshold 20.3


def reference_owl(model, windows, m, lam, target):
    """OWL from a plain dense forward with hooks: per-layer inputs -> Wanda norms -> outlier ratios -> formula."""
    prefix, blocks = decoder_blocks(model)
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for index, block in enumerate(blocks):
        for name, module in linear_layers(block, f"{prefix}.{index}").items():
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: inputs.setdefault(name, []).append(args[0].detach())))
    with torch.no_grad():
        model(windows, use_cache=False)
    for hook in hooks:
        hook.remove()
    ratios = []
    for index, block in enumerate(blocks):
        scores = []
        for name, module in linear_layers(block, f"{prefix}.{index}").items():
            x = torch.cat(inputs[name]).reshape(-1, module.in_features).double()
            norms = (x.square().sum(0) / len(windows)).sqrt()
            scores.append((module.weight.detach().double().abs() * norms).flatten())
        every = torch.cat(scores)
        ratios.append(100.0 * (every > m * every.mean()).sum().item() / every.numel())
    low, high = min(ratios), max(ratios)
    scaled = [(d - low) / (high - low) * 2 * lam for d in ratios]
    return ratios, [target - (d - sum(scaled) / len(scaled)) for d in scaled]


def test_owl_on_a_model_matches_the_reference_and_the_budget_is_exact():
    model, tokenizer = make_model("llama", layers=4), make_tokenizer()
    windows = calibration(tokenizer)
    ratios, block_sparsity = reference_owl(model, windows, m=3.0, lam=0.1, target=0.6)
    report = sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.6, nsamples=8, seqlen=64,
                             allocation=get_allocation("owl", m=3.0, lam=0.1))
    assert report.allocation["statistics"]["outlier_ratio"] == pytest.approx(ratios, rel=1e-6)
    assert len(set(ratios)) > 2  # the blocks really differ
    modules = dict(model.named_modules())
    total = zeros = 0
    for layer in report.layers:
        block = int(layer.name.split(".")[2])
        numel = layer.shape[0] * layer.shape[1]
        # each layer is within one weight of its block's published ratio
        assert abs(layer.target * numel - block_sparsity[block] * numel) <= 1 + 1e-6, layer.name
        zeros += (weight_matrix(modules[layer.name]) == 0).sum().item()
        total += numel
    assert zeros == round(0.6 * total)  # the mean by parameter count is the target, to the weight


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(0.05, 0.95), st.integers(10, 5000)), min_size=1, max_size=12),
       st.floats(0.1, 0.9))
def test_realize_prunes_exactly_the_budget(layers, target):
    slots = [LayerSlot(f"b{i}.l", f"b{i}", 1, size) for i, (_, size) in enumerate(layers)]
    desired = {s.name: ratio for s, (ratio, _) in zip(slots, layers, strict=True)}
    plan = realize(desired, slots, target, Pattern())
    counts = [round(plan.layer_sparsity[s.name] * s.numel) for s in slots]
    assert sum(counts) == round(target * sum(s.numel for s in slots))
    assert all(0 <= c < s.numel for c, s in zip(counts, slots, strict=True))


# From 10 weights a layer, ratios <= 0.9 never reach the cap (all but one weight of a layer): below
# that the cap can bind (a 1-weight layer asked for half a weight prunes none) and the budget must go
# elsewhere, so no layer-by-layer bound holds.
@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 0.9), st.integers(10, 5000)), min_size=2, max_size=12))
def test_realize_keeps_each_layer_within_one_weight_of_ratios_that_meet_the_target(layers):
    slots = [LayerSlot(f"b{i}.l", f"b{i}", 1, size) for i, (_, size) in enumerate(layers)]
    target = sum(ratio * size for ratio, size in layers) / sum(size for _, size in layers)
    plan = realize({s.name: r for s, (r, _) in zip(slots, layers, strict=True)}, slots, target, Pattern())
    for slot, (ratio, size) in zip(slots, layers, strict=True):
        assert abs(plan.layer_sparsity[slot.name] * size - ratio * size) < 1 + 1e-6


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 7), min_size=1, max_size=10), st.integers(1, 5))
def test_apportion_with_equal_weights_is_hamilton(shares, weight):
    total = round(sum(shares))
    units = apportion(shares, [weight] * len(shares), [7] * len(shares), total * weight)
    assert sum(units) == total and all(abs(u - s) < 1 + 1e-9 for u, s in zip(units, shares, strict=True))
    # larger remainders are never passed over for smaller ones
    for i, j in itertools.permutations(range(len(shares)), 2):
        if units[i] > math.floor(shares[i]) and units[j] == math.floor(shares[j]) and units[j] < 7:
            assert shares[i] - math.floor(shares[i]) >= shares[j] - math.floor(shares[j]) - 1e-12


def test_nm_allocation_varies_n_per_block_around_the_pattern():
    model, tokenizer = make_model("llama", layers=4), make_tokenizer()
    report = sparsellm.prune(model, tokenizer, method="wanda", pattern="4:8", nsamples=8, seqlen=64,
                             allocation=get_allocation("owl", lam=0.2))
    modules = dict(model.named_modules())
    per_block = {}
    for layer in report.layers:
        n, m = map(int, layer.pattern.split(":"))
        per_block.setdefault(layer.name.split(".")[2], set()).add(n)
        weight = weight_matrix(modules[layer.name])
        kept = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)
        assert (kept <= n).all(), layer.name
    block_n = [next(iter(ns)) for ns in per_block.values()]
    assert all(len(ns) == 1 for ns in per_block.values())  # one N per block
    assert sum(block_n) == 4 * len(block_n) and len(set(block_n)) > 1  # mean N is 4, and N varies
    assert report.achieved_sparsity == pytest.approx(0.5, abs=1e-3)


def test_sensitivity_solver_matches_brute_force():
    fits = [(-6.0, 8.0), (-5.0, 5.0), (-7.0, 12.0)]
    sizes = [300, 100, 200]
    ratios = solve_exponential(fits, sizes, target=0.6, high=0.9)
    assert sum(r * n for r, n in zip(ratios, sizes, strict=True)) == pytest.approx(0.6 * 600, abs=1e-6)

    def loss(rs):
        return sum(math.exp(a + c * r) for (a, c), r in zip(fits, rs, strict=True))

    best = math.inf
    for s0, s1 in itertools.product([i / 400 for i in range(361)], repeat=2):
        s2 = (0.6 * 600 - 300 * s0 - 100 * s1) / 200
        if 0 <= s2 <= 0.9:
            best = min(best, loss([s0, s1, s2]))
    assert loss(ratios) <= best + 1e-9
    assert loss(ratios) == pytest.approx(best, rel=1e-3)


def test_exponential_fit_recovers_the_curve():
    a, c = fit_exponential([0.5, 0.6, 0.7], [math.exp(-4 + 6 * s) for s in (0.5, 0.6, 0.7)])
    assert (a, c) == pytest.approx((-4.0, 6.0))


def silence_all_but(model, live: int, keep_attention: bool = True):
    """Scale the output projections of every other block by 0.01: only block ``live`` can matter."""
    _, blocks = decoder_blocks(model)
    with torch.no_grad():
        for index, block in enumerate(blocks):
            for name, module in block.named_modules():
                if name.endswith(("o_proj", "down_proj")) and (index != live or
                                                              (not keep_attention and "attn" in name)):
                    module.weight.mul_(0.01)
    return model


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_sensitivity_prunes_the_sensitive_part_least_and_meets_the_budget(granularity):
    tokenizer = make_tokenizer()
    model = silence_all_but(make_model("llama", layers=3), live=2, keep_attention=granularity == "block")
    strategy = get_allocation("sensitivity", granularity=granularity, windows=1)
    report = sparsellm.prune(model, tokenizer, method="wanda", sparsity=0.6, nsamples=4, seqlen=64,
                             allocation=strategy)
    targets = {layer.name: layer.target for layer in report.layers}
    if granularity == "block":
        live = [t for n, t in targets.items() if ".layers.2." in n]
        others = [t for n, t in targets.items() if ".layers.2." not in n]
    else:
        live = [targets["model.layers.2.mlp.down_proj"]]
        others = [t for n, t in targets.items() if ".layers.2.mlp." not in n]
    assert max(live) < min(others) - 0.1, targets
    statistics = report.allocation["statistics"]
    assert statistics["levels"] == [0.5, 0.6, 0.7] and len(statistics["groups"]) == (3 if granularity == "block"
                                                                                      else 21)
    zeros = sum(round(layer.sparsity * layer.shape[0] * layer.shape[1]) for layer in report.layers)
    assert zeros == round(0.6 * sum(layer.shape[0] * layer.shape[1] for layer in report.layers))


def test_table_first_match_wins_and_other_layers_get_the_target(tmp_path):
    model, tokenizer = make_model("llama", layers=2), make_tokenizer()
    table = tmp_path / "table.yaml"
    table.write_text("'layers\\.0\\.mlp': 0.25\n'mlp': 0.75\n'k_proj': 0.0\n")
    report = sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5,
                             allocation=get_allocation("table", rules=str(table)))
    targets = {layer.name: layer.target for layer in report.layers}
    assert targets["model.layers.0.mlp.up_proj"] == 0.25 and targets["model.layers.1.mlp.up_proj"] == 0.75
    assert targets["model.layers.1.self_attn.q_proj"] == 0.5 and targets["model.layers.0.self_attn.k_proj"] == 0
    assert (model.model.layers[0].self_attn.k_proj.weight != 0).all()
    for bad, message in [("'(': 0.5\n", "bad regex"), ("'mlp': 1.5\n", "sparsity must be in"),
                         ("- 0.5\n", "mapping")]:
        table.write_text(bad)
        with pytest.raises(SparseLLMError, match=message):
            get_allocation("table", rules=str(table))


def test_allocation_errors():
    model, tokenizer = make_model("llama", layers=2), make_tokenizer()
    with pytest.raises(SparseLLMError, match="unknown allocation"):
        sparsellm.prune(model, tokenizer, method="wanda", allocation="nope")
    with pytest.raises(SparseLLMError, match="bad option for allocation owl"):
        get_allocation("owl", lamda=0.1)
    with pytest.raises(SparseLLMError, match=r"0 <= lambda < 0\.5"):
        get_allocation("owl", lam=0.7)
    with pytest.raises(SparseLLMError, match="above the highest probed level"):
        sparsellm.prune(model, tokenizer, method="wanda", sparsity=0.9, nsamples=2, seqlen=32,
                        allocation=get_allocation("sensitivity", levels=[0.3, 0.5]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_running_the_model_from_a_block_gives_its_own_logits(arch):
    model = make_model(arch, layers=3)
    tokens = calibration(make_tokenizer(arch == "gemma3"), count=2, seqlen=32)
    with torch.no_grad():
        expected = model(tokens, use_cache=False).logits
        for step in engine.walk(model, tokens, batch_size=2):
            hidden = step.activations.hidden[0].clone()
            torch.testing.assert_close(engine.logits_from(model, step.index, hidden, tokens), expected,
                                       rtol=1e-4, atol=1e-4)


def test_nm_with_per_layer_sensitivity_varies_n_within_a_block():
    model, tokenizer = make_model("llama", layers=2), make_tokenizer()
    report = sparsellm.prune(model, tokenizer, method="magnitude", pattern="4:8", nsamples=4, seqlen=64,
                             allocation=get_allocation("sensitivity", granularity="layer", windows=1,
                                                       levels=[0.25, 0.5, 0.75]))
    modules = dict(model.named_modules())
    for layer in report.layers:
        if layer.pattern != "dense":
            n, m = map(int, layer.pattern.split(":"))
            kept = (weight_matrix(modules[layer.name]).reshape(layer.shape[0], -1, m) != 0).sum(-1)
            assert (kept <= n).all() and m == 8, layer.name
    assert len({layer.pattern for layer in report.layers if ".layers.0." in layer.name}) > 1
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.02)


def test_tune_owl_scores_each_candidate_as_a_separate_prune_would(llama_folder):
    """Every grid point's held-out perplexity equals pruning from scratch with that OWL and scoring the
    held-out calibration windows; the best is chosen, and the model comes back dense."""
    from sparsellm.evaluation import window_nll
    from sparsellm.models import load_model
    from sparsellm.weights.allocation.owl import tune_owl
    from sparsellm.weights.oneshot import calibration_windows

    model, tokenizer = load_model(llama_folder)
    before = {name: p.clone() for name, p in model.named_parameters()}
    tuned = tune_owl(model, tokenizer, 0.6, nsamples=4, held_out=2, seqlen=64, ms=(2.0, 20.0), lams=(0.05, 0.2))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert [(g["m"], g["lam"]) for g in tuned.grid] == [("uniform", 0.0), (2.0, 0.05), (2.0, 0.2), (20.0, 0.05),
                                                        (20.0, 0.2)]
    best = min(tuned.grid[1:], key=lambda g: g["perplexity"])
    assert (tuned.owl.m, tuned.owl.lam) == (best["m"], best["lam"])
    windows, _ = calibration_windows(model, tokenizer, nsamples=6, seqlen=64)
    for candidate in (tuned.grid[0], tuned.grid[2], tuned.grid[3]):
        fresh, _ = load_model(llama_folder)
        allocation = "uniform" if candidate["m"] == "uniform" else get_allocation("owl", m=candidate["m"],
                                                                                  lam=candidate["lam"])
        sparsellm.prune(fresh, tokenizer, method="wanda", sparsity=0.6, allocation=allocation, nsamples=4, seqlen=64)
        with torch.no_grad():
            total, count = window_nll(fresh, windows[4:])
        assert math.exp(total / count) == pytest.approx(candidate["perplexity"], rel=1e-5)
    assert len({round(g["perplexity"], 6) for g in tuned.grid}) > 1  # the candidates really differ


def test_owl_tune_from_the_cli_saves_the_chosen_pair(llama_folder, tmp_path, capsys):
    import yaml

    from sparsellm.cli import main

    common = ["prune", "--model", str(llama_folder), "--method", "wanda", "--nsamples", "4", "--seqlen", "64"]
    assert main([*common, "--sparsity", "0.6", "--allocation", "owl", "--owl-tune", "--output",
                 str(tmp_path / "tuned")]) == 0
    assert "OWL tuned on 16 held-out calibration windows: M " in capsys.readouterr().out
    recipe = yaml.safe_load((tmp_path / "tuned" / "recipe.yaml").read_text())
    assert set(recipe["allocation_options"]) == {"m", "lam"}  # the chosen pair, not the request to tune
    assert main([*common, "--sparsity", "0.6", "--owl-tune", "--output", str(tmp_path / "x")]) == 2
    assert "tuning OWL needs --allocation owl and a --sparsity" in capsys.readouterr().err
