"""Dense-to-MoE conversion (MoEfication, upcycling), saving and loading, training, and the CLI verbs."""

import copy
import importlib
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import sparsellm
from sparsellm import checkpoint
from sparsellm.activations.moe import (
    PackedExperts,
    load_balancing_loss,
    moe_layers,
    pack_experts,
    router_z_loss,
    set_top_k,
    upcycle,
)
from sparsellm.activations.moe.moefy import (
    balanced_assignment,
    balanced_kmeans,
    fit_down_projections,
    fit_router,
    moefy,
)
from sparsellm.activations.moe.train import (
    PROMPT_TOKENS,
    distill_experts,
    plot_training,
    router_losses,
    train,
)
from sparsellm.activations.moe.upcycle import moe_block_indices
from sparsellm.cli import main
from sparsellm.data import Text, load_text, token_windows
from sparsellm.errors import SparseLLMError
from sparsellm.models import decoder_blocks, linear_layers, load_model
from tiny import make_model, make_tokenizer

GATED = ("llama", "qwen2", "gemma3")


def tokens(seed=0, shape=(2, 24)):
    return torch.randint(3, 320, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_balanced_assignment_gives_equal_groups_and_respects_clear_preferences():
    scores = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
    labels = balanced_assignment(scores, 6)
    assert torch.bincount(labels, minlength=4).tolist() == [6, 6, 6, 6]
    # when every item's favourite cluster has room for all its fans, each gets its favourite
    favourite = torch.arange(12) % 3
    clear = torch.nn.functional.one_hot(favourite, 3).float() + 0.01 * torch.rand(12, 3)
    assert torch.equal(balanced_assignment(clear, 4), favourite)
    with pytest.raises(SparseLLMError, match="cannot split 10 items into 4 groups"):
        balanced_assignment(torch.zeros(10, 4), 2)


def test_balanced_kmeans_recovers_planted_groups():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=generator)
    truth = torch.randperm(40, generator=generator) % 4
    points = centres[truth] + 0.1 * torch.randn(40, 32, generator=generator)
    labels = balanced_kmeans(points, 4)
    assert torch.bincount(labels).tolist() == [10] * 4
    # the same partition up to renaming: items share a label exactly when they share a planted group
    assert torch.equal(labels.unsqueeze(0) == labels.unsqueeze(1), truth.unsqueeze(0) == truth.unsqueeze(1))


def test_least_squares_router_is_the_least_squares_fit_of_per_token_standardised_scores():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(500, 12, generator=generator)
    scores = (inputs @ torch.randn(5, 12, generator=generator).t()).exp()
    standardised = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True)
    design = torch.cat([inputs, torch.ones(500, 1)], dim=1).double()
    expected = torch.linalg.lstsq(design, standardised.double()).solution.float()
    weight, bias = fit_router(inputs, scores, top_k=2, ridge=0.0)
    torch.testing.assert_close(weight, expected[:12].t(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias, expected[12], rtol=1e-4, atol=1e-5)


def test_router_training_learns_top_k_labels():
    """Scores that rank experts linearly but grow exponentially: least squares on them ranks imperfectly,
    training on the top-k labels ranks better."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1000, 8, generator=generator)
    scores = (2 * inputs @ torch.randn(4, 8, generator=generator).t()).exp()

    def recall(weight, bias):
        chosen = (inputs @ weight.t() + bias).topk(2, dim=1).indices
        best = scores.topk(2, dim=1).indices
        return (chosen.unsqueeze(2) == best.unsqueeze(1)).any(2).float().mean().item()

    untrained = recall(*fit_router(inputs, scores, top_k=2))
    trained = recall(*fit_router(inputs, scores, top_k=2, steps=100, lr=0.1))
    assert 0.8 < untrained < trained - 0.03


def test_down_projections_are_the_least_squares_fit_of_the_chosen_experts():
    """Against a brute-force least squares: the design matrix written out token by token, each token's
    unchosen experts' activations zeroed; and with every expert chosen the dense down weights come back."""
    generator = torch.Generator().manual_seed(0)
    tokens_, hidden, experts, size = 300, 6, 4, 3
    activations = torch.randn(tokens_, experts * size, generator=generator)
    groups = torch.randperm(experts * size, generator=generator).view(experts, size)
    down = torch.randn(hidden, experts * size, generator=generator)
    targets = activations @ down.t()
    chosen = torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(tokens_)])
    fitted = fit_down_projections(activations, chosen, groups, targets, ridge=0.0)
    design = torch.zeros(tokens_, experts * size, dtype=torch.float64)
    for t in range(tokens_):
        for e in chosen[t].tolist():
            design[t, e * size:(e + 1) * size] = activations[t, groups[e]].double()
    expected = torch.linalg.lstsq(design, targets.double()).solution.float()  # (E * size, H), experts in order
    torch.testing.assert_close(fitted, expected.view(experts, size, hidden).transpose(1, 2), rtol=1e-4, atol=1e-4)
    residual = lambda d: (design.float() @ d.transpose(1, 2).reshape(-1, hidden) - targets).norm()  # noqa: E731
    assert residual(fitted) < residual(torch.stack([down[:, g] for g in groups]))
    everyone = torch.arange(experts).expand(tokens_, experts)
    torch.testing.assert_close(fit_down_projections(activations, everyone, groups, targets, ridge=0.0),
                               torch.stack([down[:, g] for g in groups]), rtol=1e-4, atol=1e-4)


def test_refitted_down_projections_bring_the_moefied_model_closer_to_the_dense_one():
    model, tokenizer = make_model("llama"), make_tokenizer()
    refitted = copy.deepcopy(model)
    plain = moefy(model, tokenizer, num_experts=4, top_k=2, nsamples=4, seqlen=32, refit_down=False)
    refit = moefy(refitted, tokenizer, num_experts=4, top_k=2, nsamples=4, seqlen=32)
    assert refit.refit_down and not plain.refit_down
    for before, after in zip(plain.layers, refit.layers, strict=True):
        assert after.relative_error < before.relative_error


@pytest.mark.parametrize("arch", GATED)
def test_moefied_model_with_all_experts_is_the_dense_model(arch):
    model, tokenizer = make_model(arch), make_tokenizer(arch == "gemma3")
    ids = tokens()
    dense = logits(model, ids)
    gate = [block.mlp.gate_proj.weight.clone() for block in decoder_blocks(model)[1]]
    report = moefy(model, tokenizer, num_experts=4, top_k=4, nsamples=4, seqlen=32)
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-4, atol=1e-4)
    assert type(model).__name__.startswith("SparseMoE") and model.config.moe["layers"] == [0, 1]
    assert [layer.relative_error for layer in report.layers] == pytest.approx([0, 0], abs=1e-5)
    for dense_gate, layer in zip(gate, moe_layers(model).values(), strict=True):
        experts = layer.experts.gate_up_proj
        assert experts.shape == (4, 2 * 32, 64)  # four equal experts of 128 / 4 neurons
        # together the experts hold every dense gate row exactly once
        rows = experts[:, :32].reshape(-1, 64)
        matches = (rows.unsqueeze(1) == dense_gate.unsqueeze(0)).all(-1)
        assert matches.sum(0).tolist() == [1] * 128 and matches.sum(1).tolist() == [1] * 128


def test_moefied_routing_is_deterministic_and_partial_routing_approximates(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    ids = tokens(1)
    dense = logits(model, ids)
    moefy(model, tokenizer, num_experts=4, top_k=2, nsamples=4, seqlen=32, refit_down=False)  # dense down weights
    first = logits(model, ids)
    chosen = [layer.last_routing.experts.clone() for layer in moe_layers(model).values()]
    assert torch.equal(logits(model, ids), first)
    assert all(torch.equal(c, layer.last_routing.experts) for c, layer in zip(chosen, moe_layers(model).values(),
                                                                              strict=True))
    assert not torch.allclose(first, dense)  # half the neurons per token: an approximation
    again = make_model("llama")
    moefy(again, tokenizer, num_experts=4, top_k=2, nsamples=4, seqlen=32, refit_down=False)
    assert torch.equal(logits(again, ids), first)  # the conversion itself is deterministic too
    set_top_k(model, 4)
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", GATED)
def test_upcycled_model_with_identical_experts_is_the_dense_model(arch):
    model = make_model(arch)
    ids = tokens(2)
    dense = logits(model, ids)
    report = upcycle(model, num_experts=4, top_k=2)
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-4, atol=1e-4)
    assert report["layers"] == [0, 1]
    layer = next(iter(moe_layers(model).values()))
    assert layer.experts.gate_up_proj.shape == (4, 256, 64)
    assert len(set(layer.last_routing.experts.reshape(-1).tolist())) > 1  # the noisy router spreads tokens
    assert not [name for name in linear_layers(decoder_blocks(model)[1][0]) if "mlp" in name]  # pruning skips MoE
    noisy = make_model(arch)
    upcycle(noisy, num_experts=4, top_k=2, expert_noise=0.1)
    assert not torch.allclose(logits(noisy, ids), dense, rtol=1e-4, atol=1e-4)


def test_moe_block_indices():
    assert moe_block_indices(6, 1) == [0, 1, 2, 3, 4, 5]
    assert moe_block_indices(6, 2) == [1, 3, 5]
    assert moe_block_indices(7, 3) == [0, 3, 6]


def test_saved_moe_folder_loads_with_sparsellm_and_only_with_it(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    moefy(model, tokenizer, num_experts=4, top_k=2, nsamples=4, seqlen=32, capacity_factor=1.5)
    ids = tokens(3)
    expected = logits(model, ids)
    folder = checkpoint.save(model, tokenizer, tmp_path / "moe")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sparsellm_moe" and config["dense_model_type"] == "llama"
    assert config["moe"]["capacity_factor"] == 1.5 and config["moe"]["weighting"] == "ones"
    loaded, _ = load_model(folder)
    assert type(loaded).__name__ == "SparseMoELlamaForCausalLM"
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    # sparsellm.load: the experts packed for the MoE kernels, the same function, and it saves back
    on_kernels = sparsellm.load(folder)
    layers = moe_layers(on_kernels).values()
    assert layers and all(isinstance(layer.experts, PackedExperts) for layer in layers)
    torch.testing.assert_close(logits(on_kernels, ids), expected, rtol=1e-5, atol=1e-5)
    resaved = checkpoint.save(on_kernels, tokenizer, tmp_path / "moe-again")
    torch.testing.assert_close(logits(load_model(resaved)[0], ids), expected, rtol=0, atol=0)

    # In a fresh process: plain transformers refuses the folder (no silent dense model), and once
    # sparsellm's MoE package is imported (registering the model type) it loads.
    script = (
        "from transformers import AutoModelForCausalLM\n"
        f"try:\n    AutoModelForCausalLM.from_pretrained({str(folder)!r})\nexcept ValueError as exc:\n"
        "    print('refused:', 'sparsellm_moe' in str(exc))\n"
        "import sparsellm.activations.moe\n"
        f"print('loaded', type(AutoModelForCausalLM.from_pretrained({str(folder)!r})).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.stdout.split("\n")[:2] == ["refused: True", "loaded SparseMoELlamaForCausalLM"], result.stderr


def test_router_losses_average_the_moe_layers():
    model = make_model("llama", layers=3)
    upcycle(model, num_experts=4, top_k=1, router_std=1.0)
    logits(model, tokens(4))
    routings = [layer.last_routing for layer in moe_layers(model).values()]
    balance, z_loss = router_losses(model)
    assert balance.item() == pytest.approx(sum(load_balancing_loss(r.probs, r.experts).item()
                                               for r in routings) / 3, rel=1e-6)
    assert z_loss.item() == pytest.approx(sum(router_z_loss(r.logits).item() for r in routings) / 3, rel=1e-6)


def test_training_with_aux_losses_lowers_the_loss_and_writes_plots(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    upcycle(model, num_experts=4, top_k=2, every=2, jitter=0.01)
    assert list(moe_layers(model)) == ["model.layers.1.mlp"]
    embedding = model.get_input_embeddings().weight.clone()
    assert pack_experts(model) == 1  # as sparsellm.load leaves a model: training unpacks it first
    log = train(model, tokenizer, steps=12, batch_size=2, seqlen=32, lr=3e-3, only_moe=True)
    assert not any(isinstance(layer.experts, PackedExperts) for layer in moe_layers(model).values())
    assert log.steps[-1]["task_loss"] < log.steps[0]["task_loss"]
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # only the MoE layer trained
    assert log.usage.shape == (1, 4) and log.usage.sum().item() == 12 * 2 * 32 * 2
    paths = plot_training({"with balance": log}, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_distillation_from_the_dense_model_brings_the_moefied_model_back_towards_it():
    """Experts trained on the KL divergence from the dense teacher: the divergence, computed here by
    hand on text the training never saw, falls; the teacher is left as it was."""
    teacher, tokenizer = make_model("llama"), make_tokenizer()
    student = copy.deepcopy(teacher)
    moefy(student, tokenizer, num_experts=4, top_k=1, nsamples=4, seqlen=32)
    teacher_state = {name: p.clone() for name, p in teacher.state_dict().items()}
    ids = token_windows(tokenizer, load_text("builtin", "evaluation"), 32)[:8]

    def divergence():
        p, q = (logits(m, ids)[:, :-1].double().log_softmax(-1) for m in (teacher, student))
        return (p.exp() * (p - q)).sum(-1).mean().item()

    before = divergence()
    log = train(student, tokenizer, steps=30, batch_size=2, seqlen=32, lr=3e-4, only_moe=True, teacher=teacher,
                balance_weight=0.0, z_weight=0.0, lr_schedule="cosine")
    assert log.objective == "distillation"
    cosine = [3e-5 + (3e-4 - 3e-5) * (1 + math.cos(math.pi * t / 29)) / 2 for t in range(30)]
    assert [s["lr"] for s in log.steps] == pytest.approx(cosine, rel=1e-6)
    assert divergence() < 0.9 * before
    assert all(torch.equal(teacher.state_dict()[name], value) for name, value in teacher_state.items())


def test_a_time_limit_plans_the_steps_that_fit_and_decays_the_rate_over_them(monkeypatch):
    """Under a clock that moves 1 s per reading, a 12.5 s limit fits 12 steps (the first 5 timed, 7 more
    planned); from the sixth step the cosine follows that plan, down to a tenth of the peak at the
    twelfth, not at the 30 asked for."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    moefy(model, tokenizer, num_experts=4, top_k=2, nsamples=2, seqlen=32)
    clock = iter(range(1000))
    moe_train = importlib.import_module("sparsellm.activations.moe.train")  # the package exports the function train
    monkeypatch.setattr(moe_train, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    log = train(model, tokenizer, steps=30, batch_size=1, seqlen=32, lr=3e-4, lr_schedule="cosine", time_limit=12.5)
    assert log.planned_steps == 12 and len(log.steps) == 12
    def cosine(t, steps):
        return 3e-5 + (3e-4 - 3e-5) * (1 + math.cos(math.pi * t / (steps - 1))) / 2

    planned = [cosine(t, 30) for t in range(5)] + [cosine(t, 12) for t in range(5, 12)]
    assert [s["lr"] for s in log.steps] == pytest.approx(planned, rel=1e-6)
    clock = iter(range(1000))  # the teacher's writing takes one tick of distill_experts' 13.5: 12 steps again
    log = distill_experts(model, make_model("llama"), tokenizer, steps=30, batch_size=1, seqlen=32, teacher_windows=2,
                          time_limit=13.5)
    assert log.planned_steps == 12 and len(log.steps) == 12
    with pytest.raises(SparseLLMError, match="time limit must be positive"):
        train(model, tokenizer, steps=3, time_limit=0)
    with pytest.raises(SparseLLMError, match="time limit must be positive"):  # before the teacher writes anything
        distill_experts(model, make_model("llama"), tokenizer, steps=3, teacher_windows=1000, time_limit=-1)


def test_distillation_trains_on_the_calibration_windows_and_the_teachers_continuations_of_them():
    """Every window of one pass is either a calibration window or the teacher's continuation of a
    calibration window's first tokens, and each appears once."""
    teacher, tokenizer = make_model("llama"), make_tokenizer()
    student = copy.deepcopy(teacher)
    moefy(student, tokenizer, num_experts=4, top_k=2, nsamples=2, seqlen=32)
    text = Text("short", "calibration", load_text("builtin", "calibration").text[:1500])
    calibration = token_windows(tokenizer, text, 32)
    seen = []
    hook = student.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    count = len(calibration)
    distill_experts(student, teacher, tokenizer, steps=count, batch_size=2, seqlen=32, data=text,
                    teacher_windows=count)
    hook.remove()
    rows = torch.cat(seen)
    assert rows.shape == (2 * count, 32)
    is_calibration = (rows[:, None] == calibration[None]).all(-1).any(-1)
    assert is_calibration.sum().item() == count and len(rows.unique(dim=0)) == 2 * count
    written = rows[~is_calibration]
    prefixes = {tuple(row[:PROMPT_TOKENS].tolist()) for row in calibration}
    assert {tuple(row[:PROMPT_TOKENS].tolist()) for row in written} == prefixes


def test_distillation_adds_the_windows_of_extra_text():
    teacher, tokenizer = make_model("llama"), make_tokenizer()
    student = copy.deepcopy(teacher)
    moefy(student, tokenizer, num_experts=4, top_k=2, nsamples=2, seqlen=32)
    text = Text("short", "calibration", load_text("builtin", "calibration").text[:1500])
    extra = Text("extra", "calibration", load_text("docstrings", "calibration").text[:1500])
    windows = torch.cat([token_windows(tokenizer, t, 32) for t in (text, extra)])
    seen = []
    hook = student.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    distill_experts(student, teacher, tokenizer, steps=len(windows), batch_size=1, seqlen=32, data=text, extra_data=extra)
    hook.remove()
    rows = torch.cat(seen)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, windows.tolist()))


def test_unknown_learning_rate_schedule_is_refused():
    with pytest.raises(SparseLLMError, match="unknown learning-rate schedule 'linear'"):
        train(make_model("llama"), make_tokenizer(), steps=1, lr_schedule="linear")


def test_non_gated_families_are_refused_in_one_line():
    with pytest.raises(SparseLLMError, match="needs gated MLPs"):
        upcycle(make_model("gpt2"))
    with pytest.raises(SparseLLMError, match="needs gated MLPs"):
        moefy(make_model("opt"), make_tokenizer(), nsamples=2, seqlen=16)


def test_cli_moefy_then_eval_and_upcycle(llama_folder, tmp_path, capsys):
    out, extra = tmp_path / "moe", tmp_path / "extra.txt"
    extra.write_text(load_text("docstrings", "evaluation").text[:3000])
    code = main(["moefy", "--model", str(llama_folder), "--experts", "4", "--top-k", "1", "--nsamples", "4",
                 "--seqlen", "32", "--router-steps", "20", "--distill-steps", "3", "--distill-batch-size", "1",
                 "--distill-seqlen", "32", "--distill-teacher-windows", "2", "--distill-extra", str(extra),
                 "--distill-minutes", "10", "--measure-decode", "--output", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "a token runs 25.0 % of each MLP's weights" in stdout and "decode MLP time per token" in stdout
    assert "distilled the experts from the dense model: 3 steps" in stdout
    metadata = json.loads((out / "sparsity.json").read_text())
    assert metadata["method"] == "moefy" and metadata["mlp_params_per_token_vs_dense"] == 0.25
    assert metadata["distillation"]["objective"] == "distillation" and len(metadata["distillation"]["steps"]) == 3
    assert metadata["distillation"]["teacher_windows"] == 2 and metadata["distillation"]["planned_steps"] == 3
    assert metadata["distillation"]["extra_data"] == str(extra)
    assert len(metadata["layers"]) == 3 and metadata["decode_mlp"]["speedup"] > 0
    assert main(["eval", "--model", str(out), "--seqlen", "32", "--windows", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1

    up = tmp_path / "up"
    code = main(["upcycle", "--model", str(llama_folder), "--experts", "4", "--top-k", "2", "--train-steps", "2",
                 "--train-batch-size", "1", "--train-seqlen", "32", "--output", str(up)])
    stdout = capsys.readouterr().out
    assert code == 0 and "upcycled 3 MLPs into 4 experts" in stdout and "trained 2 steps" in stdout
    assert (up / "loss.png").exists() and (up / "expert_usage.png").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["moefy", "--experts", "5"], "do not split into 5 equal experts"),
    (["moefy", "--top-k", "9", "--experts", "8"], "top-k must be between 1 and the number of experts (8)"),
    (["upcycle", "--capacity-factor", "-1"], "capacity factor must be positive"),
    (["moefy", "--cluster", "nope"], None),
])
def test_cli_bad_input(llama_folder, tmp_path, capsys, argv, message):
    full = [*argv, "--model", str(llama_folder), "--output", str(tmp_path / "o")]
    if argv[0] == "moefy":
        full += ["--nsamples", "2", "--seqlen", "16"]
    if message is None:  # argparse rejects the choice itself
        with pytest.raises(SystemExit):
            main(full)
        return
    assert main(full) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
