"""Whole models on the kernels, and activation sparsity (TEAL), on tiny random models of five families.

The reference is always the same weights run densely by transformers (with the thresholds applied
by plain hooks where activation sparsity is on).
"""

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

import sparsellm
from sparsellm.activations import ActivationSparsity, calibrate, held_out_sparsity
from sparsellm.activations.teal import AbsHistogram
from sparsellm.cli import main
from sparsellm.errors import SparseLLMError
from sparsellm.kernels import SparseLinear, backend, dispatch, load, use_kernels
from sparsellm.models import decoder_blocks, linear_layers, load_model


def kernel_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruned_model_on_kernels_matches_dense(tiny_folder, pattern):
    model, tokenizer = load_model(tiny_folder)
    sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5 if pattern == "unstructured" else None,
                    pattern=pattern)
    tokens = torch.randint(3, 300, (2, 20))
    with torch.no_grad():
        expected = model(tokens).logits
        report = use_kernels(model, "sparse")
        layers = kernel_layers(model)
        assert layers and sum(report.layers.values()) == len(layers)
        assert {layer.layout.format for layer in layers} == {"bitmask" if pattern == "unstructured" else "2:4"}
        assert report.dense_bytes == sum(4 * layer.out_features * layer.in_features for layer in layers)
        assert report.kernel_bytes < report.dense_bytes * 0.6
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-4, atol=1e-4)
        for layer in layers:
            layer.dispatch, layer.crossover = "auto", {torch.float32: 4}  # prefill of 20 tokens: dense path
        torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(tokens[:, :3]).logits, expected[:, :3], rtol=1e-4, atol=1e-4)


def test_auto_measures_and_caches_the_crossover(llama_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELLM_CACHE", str(tmp_path))
    monkeypatch.setattr(dispatch, "_memory", {})  # what earlier tests of this process measured
    model, tokenizer = load_model(llama_folder)
    sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.6)
    use_kernels(model, "auto")
    layer = kernel_layers(model)[0]
    assert not layer.crossover
    with torch.no_grad():
        model(torch.randint(3, 300, (1, 5)))
    assert all(isinstance(peer.crossover[torch.float32], int) for peer in layer.peers)
    cache = json.loads((tmp_path / "kernels" / "crossover.json").read_text())
    assert any("bitmask" in key and f"{layer.out_features}x{layer.in_features}" in key for key in cache)


def test_crossover_survives_a_stall(monkeypatch):
    """A stall of the machine over one path's first runs must not cache the dense path for one token."""
    calls = []

    def linear(layout, x, threshold=None, sparse=True, bias=None):  # sparse faster up to 8 tokens
        calls.append(sparse)
        time.sleep((x.shape[0] if sparse else 12) * 1e-3 + (0.1 if len(calls) <= 6 else 0.0))

    monkeypatch.setattr(dispatch.backend, "linear", linear)
    layout = SparseLinear.from_dense(torch.randn(8, 64)).layout
    assert dispatch.measure([layout], None) == 8
    assert calls[:4] == [True, False, True, False]  # interleaved


def test_greedy_generation_equal(llama_folder, tmp_path):
    model, tokenizer = load_model(llama_folder)
    sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5)
    folder = sparsellm.save(model, tokenizer, tmp_path / "pruned")
    prompt = tokenizer("def main():", return_tensors="pt").input_ids
    outputs = {}
    for kernels in ("dense", "sparse", "auto"):
        loaded = load(folder, kernels=kernels)
        assert bool(kernel_layers(loaded)) == (kernels != "dense")
        with torch.no_grad():
            outputs[kernels] = loaded.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                               attention_mask=torch.ones_like(prompt), pad_token_id=2)
    assert torch.equal(outputs["sparse"], outputs["dense"]) and torch.equal(outputs["auto"], outputs["dense"])


def test_histogram_quantile_matches_exact():
    generator = torch.Generator().manual_seed(0)
    histogram = AbsHistogram(64)
    batches = [torch.randn(4, 50, 64, generator=generator) * scale for scale in (1.0, 3.0, 0.5)]
    batches.append(torch.distributions.Exponential(2.0).sample((9, 64)))  # skewed, non-negative
    for batch in batches:
        histogram.add_batch(batch)
    values = torch.cat([b.reshape(-1) for b in batches]).abs()
    for fraction in (0.1, 0.25, 0.5, 0.9, 0.98):
        threshold = histogram.quantile(fraction)
        assert (values <= threshold).float().mean().item() == pytest.approx(fraction, abs=2e-3)


def test_thresholds_hit_target_on_held_out_text(arch, tiny_folder):
    model, tokenizer = load_model(tiny_folder)
    target = 0.4
    result = calibrate(model, tokenizer, target, nsamples=16, seqlen=128)  # calibration split
    prefix, blocks = decoder_blocks(model)
    assert set(result.thresholds) == {n for i, b in enumerate(blocks) for n in linear_layers(b, f"{prefix}.{i}")}
    held_out = held_out_sparsity(model, tokenizer, result, seqlen=128, windows=16)  # evaluation split
    # Inputs after a ReLU (OPT's fc2) are zero more often than the target: nothing can make them denser.
    exact_zeros = held_out_sparsity(model, tokenizer, ActivationSparsity(0, dict.fromkeys(result.thresholds, 0.0),
                                                                          result.targets), seqlen=128, windows=16)
    errors = {name: reached - max(target, exact_zeros[name]) for name, reached in held_out.items()}
    assert abs(sum(errors.values()) / len(errors)) < 0.02, errors  # the model's activation sparsity
    assert max(map(abs, errors.values())) < 0.06, errors  # tiny random models' attention outputs shift most


def test_activation_sparsity_on_kernels_matches_hooks(llama_folder, tmp_path):
    model, tokenizer = load_model(llama_folder)
    sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5)
    folder = sparsellm.save(model, tokenizer, tmp_path / "pruned")
    result = calibrate(model, tokenizer, 0.4, nsamples=4, seqlen=64)
    assert len(set(result.thresholds.values())) < len(result.thresholds)  # q/k/v and gate/up share inputs
    result.write(folder)
    assert ActivationSparsity.read(folder).thresholds == result.thresholds
    tokens = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        plain = model(tokens).logits
        hooked = load(folder, kernels="dense")(tokens).logits
        sparse = load(folder, kernels="sparse")
        assert all(layer.layout.input_major and layer.threshold is not None for layer in kernel_layers(sparse))
        torch.testing.assert_close(sparse(tokens).logits, hooked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, hooked, atol=1e-3)  # the thresholds do change the function


def test_activation_sparsity_errors(llama_folder, tmp_path):
    (tmp_path / "activation_sparsity.json").write_text('{"sparsity": 0.5}')
    with pytest.raises(SparseLLMError, match="not a valid activation sparsity file"):
        ActivationSparsity.read(tmp_path)
    model, tokenizer = load_model(llama_folder)
    with pytest.raises(SparseLLMError, match="lacks"):
        ActivationSparsity(0.5, {"no.such.layer": 0.1}, {"no.such.layer": 0.5}).attach(model)
    with pytest.raises(SparseLLMError, match="sparsity must be in"):
        calibrate(model, tokenizer, 1.5)
    with pytest.raises(SparseLLMError, match="unknown kernels"):
        use_kernels(model, "fast")


def test_cli_activation_sparsity_generate_bench(llama_folder, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(llama_folder), "--method", "magnitude", "--sparsity", "0.5",
                 "--output", str(out), "--activation-sparsity", "0.4", "--activation-nsamples", "4",
                 "--held-out-windows", "2", "--eval", "--eval-seqlen", "64", "--eval-windows", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "held-out sparsity" in stdout and "perplexity with 40% activation sparsity" in stdout
    assert ActivationSparsity.read(out).sparsity == 0.4

    assert main(["sparsify-activations", str(out), "--sparsity", "0.25", "--activation-nsamples", "4",
                 "--seqlen", "64", "--held-out-windows", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == 0.25
    assert ActivationSparsity.read(out).sparsity == 0.25

    assert main(["eval", "--model", str(out), "--seqlen", "64", "--windows", "2", "--json"]) == 0
    with_thresholds = json.loads(capsys.readouterr().out)["perplexity"]
    (out / "activation_sparsity.json").rename(tmp_path / "saved.json")
    assert main(["eval", "--model", str(out), "--seqlen", "64", "--windows", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] != with_thresholds  # eval applies the thresholds
    (tmp_path / "saved.json").rename(out / "activation_sparsity.json")

    assert main(["generate", str(out), "--prompt", "class A:", "--max-new-tokens", "5", "--kernels", "sparse"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("class A:") and "5 tokens in" in captured.err

    assert main(["bench", str(out), "--tokens", "3", "--prefill", "16", "--repeats", "1", "--layers", "--json",
                 "--cache", "growing"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cache"] == "growing"
    assert [row["variant"] for row in result["rows"]] == ["dense float32", "dense bfloat16", "sparsellm"]
    assert max(row["decode_ratio"] for row in result["rows"][:2]) == pytest.approx(1.0)
    assert {row["layer"] for row in result["layers"]} >= {"self_attn.q_proj", "mlp.down_proj"}

    assert main(["sparsify-activations", str(tmp_path / "missing"), "--sparsity", "0.5"]) == 2
    assert "not a model folder" in capsys.readouterr().err


@pytest.mark.parametrize(("pattern", "scheme"), [
    ("unstructured", None), ("2:4", None), ("unstructured", sparsellm.QuantScheme(4, 64, symmetric=False)),
    ("2:4", sparsellm.QuantScheme(8, 0)), ("2:4", sparsellm.QuantScheme(4, 32)),  # 32: groups the kernels dequantize
])
def test_compact_folder_runs_packed_layers(llama_folder, tmp_path, pattern, scheme):
    """A compact checkpoint's packed layers become kernel layouts directly, integer codes included."""
    model, tokenizer = load_model(llama_folder)
    sparsellm.prune(model, tokenizer, method="sparsegpt", sparsity=0.5 if pattern == "unstructured" else None,
                    pattern=pattern, nsamples=4, seqlen=64, quantization=scheme)
    # codes keep their exact float32 dequantized values (a bfloat16 save would round the dense rebuild)
    folder = sparsellm.save(model, tokenizer, tmp_path / "compact", dtype="bfloat16" if scheme is None else None)
    tokens = torch.randint(3, 300, (1, 9))
    with torch.no_grad():
        dense = sparsellm.load(folder, kernels="dense")
        expected = dense(tokens).logits
        sparse = sparsellm.load(folder, kernels="sparse")
        layers = kernel_layers(sparse)
        assert len(layers) == 3 * 7
        codecs = {layer.layout.codec for layer in layers}
        if scheme is None:
            assert codecs == {"bfloat16"}
        elif scheme.group_size == 32:
            assert codecs == {"float32"}  # the dequantized values, as saved
        else:
            assert codecs == {"uint4" if scheme.bits == 4 else "uint8"}
        assert {layer.layout.format for layer in layers} == {"bitmask" if pattern == "unstructured" else "2:4"}
        torch.testing.assert_close(sparse(tokens).logits, expected, rtol=1e-4, atol=1e-4)
        # the packed layers never were dense: the report counts them as the float32 model would hold them
        report = use_kernels(sparse, "sparse", fuse=False)
        assert report.dense_bytes == sum(4 * layer.out_features * layer.in_features for layer in layers)
        assert report.kernel_bytes == sum(layer.layout.nbytes for layer in layers) < report.dense_bytes * 0.6


def test_load_stores_values_in_a_16_bit_compute_dtype(llama_folder, tmp_path):
    """A float32 compact folder loaded for bfloat16 compute stores its values in bfloat16 (as a dense
    folder does), unless weight_dtype says otherwise; float32 compute keeps them as saved."""
    model, tokenizer = load_model(llama_folder)
    sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5)
    folder = sparsellm.save(model, tokenizer, tmp_path / "compact")
    assert {layer.layout.codec for layer in kernel_layers(sparsellm.load(folder, kernels="sparse"))} == {"float32"}
    bf16 = sparsellm.load(folder, dtype=torch.bfloat16, kernels="sparse")
    assert {layer.layout.codec for layer in kernel_layers(bf16)} == {"bfloat16"}
    kept = sparsellm.load(folder, dtype=torch.bfloat16, kernels="sparse", weight_dtype=torch.float32)
    assert {layer.layout.codec for layer in kernel_layers(kept)} == {"float32"}


def test_activation_sparsity_in_a_recipe(llama_folder, tmp_path, capsys):
    """The recipe's activations section calibrates on the in-memory pruned model: the saved thresholds
    equal a separate calibration of the saved folder, and a recipe file alone reproduces them."""
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(llama_folder), "--method", "magnitude", "--sparsity", "0.5",
                 "--output", str(out), "--activation-sparsity", "0.3", "--activation-nsamples", "4",
                 "--held-out-windows", "0", "--seqlen", "64"]) == 0
    saved = ActivationSparsity.read(out)
    model, tokenizer = load_model(out)
    expected = calibrate(model, tokenizer, 0.3, nsamples=4, seqlen=64)
    assert saved.thresholds == pytest.approx(expected.thresholds, rel=1e-6)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["activations"] == {"sparsity": 0.3, "nsamples": 4, "held_out_windows": 0}
    assert main(["prune", "--recipe", str(out / "recipe.yaml"), "--output", str(tmp_path / "again")]) == 0
    assert ActivationSparsity.read(tmp_path / "again").thresholds == saved.thresholds
    assert main(["prune", "--model", str(llama_folder), "--method", "magnitude", "--target-size", "1MB",
                 "--activation-sparsity", "0.3", "--output", str(tmp_path / "sized")]) == 2
    assert "activation sparsity does not change the checkpoint's size" in capsys.readouterr().err
    assert not (tmp_path / "sized").exists()


def test_auto_dtype_follows_the_cpu(llama_folder, tmp_path):
    flags = Path("/proc/cpuinfo").read_text().split() if backend.extension() is not None else []
    hardware = "avx512_bf16" in flags and backend.current().name != "torch"
    assert backend.compute_dtype() == (torch.bfloat16 if hardware else torch.float32)
    with backend.use_backend("torch"):
        assert backend.compute_dtype() == torch.float32
    model, tokenizer = load_model(llama_folder)
    sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5)
    folder = sparsellm.save(model, tokenizer, tmp_path / "pruned")
    loaded = load(folder, dtype="auto")
    assert loaded.dtype == backend.compute_dtype()
    layers = kernel_layers(loaded)
    assert layers and {layer.layout.codec for layer in layers} == {"bfloat16"}
