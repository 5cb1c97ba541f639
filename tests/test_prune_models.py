"""End to end on five tiny families: exact targets, finite outputs, identical logits after reload."""

import json

import pytest
import torch

import sparsellm
from sparsellm.errors import SparseLLMError
from sparsellm.models import decoder_blocks, linear_layers, load_model, weight_matrix

CASES = [("magnitude", "unstructured", 0.6), ("wanda", "2:4", None), ("sparsegpt", "unstructured", 0.5),
         ("sparsegpt", "4:8", None)]


@pytest.mark.parametrize(("method", "pattern", "sparsity"), CASES)
def test_prune_save_reload(tiny_folder, tmp_path, method, pattern, sparsity):
    model, tokenizer = load_model(tiny_folder)
    report = sparsellm.prune(model, tokenizer, method=method, sparsity=sparsity, pattern=pattern,
                             nsamples=4, seqlen=64, batch_size=3)
    prefix, blocks = decoder_blocks(model)
    layers = {n: m for i, b in enumerate(blocks) for n, m in linear_layers(b, f"{prefix}.{i}").items()}
    assert [r.name for r in report.layers] == list(layers)
    for name, module in layers.items():
        weight = weight_matrix(module)
        if pattern == "unstructured":
            assert (weight == 0).sum().item() == round(sparsity * weight.numel()), name
        else:
            n, m = map(int, pattern.split(":"))
            kept = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)
            assert (kept <= n).all() and (weight == 0).sum() >= weight.numel() * (m - n) // m, name
    for untouched in ("embed", "lm_head", "wte", "wpe"):
        for name, param in model.named_parameters():
            if untouched in name:
                assert (param != 0).float().mean() > 0.99, name

    tokens = torch.randint(3, 300, (2, 24))
    logits = model(tokens).logits
    assert torch.isfinite(logits).all()
    out = sparsellm.save(model, tokenizer, tmp_path / "out", report.to_dict())
    reloaded, _ = load_model(out)
    torch.testing.assert_close(reloaded(tokens).logits, logits, rtol=0, atol=0)
    metadata = json.loads((out / "sparsity.json").read_text())
    assert metadata["method"] == method and len(metadata["layers"]) == len(layers)
    assert "torch" in metadata["versions"]
    if method != "magnitude":
        assert metadata["calibration"]["sha256_16"] and metadata["calibration"]["nsamples"] == 4


def test_ignore_and_layer_sparsity(llama_folder):
    model, tokenizer = load_model(llama_folder)
    report = sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5, ignore=[r"\.mlp\.down_proj$"],
                             layer_sparsity={"model.layers.0.self_attn.q_proj": 0.25})
    names = {r.name: r for r in report.layers}
    assert not any(n.endswith("down_proj") for n in names)
    assert names["model.layers.0.self_attn.q_proj"].sparsity == 0.25
    assert (model.model.layers[0].mlp.down_proj.weight != 0).all()


def test_bad_arguments(llama_folder):
    model, tokenizer = load_model(llama_folder)
    for kwargs, message in [
        ({"sparsity": 1.0}, "sparsity must be in"),
        ({"sparsity": -0.1}, "sparsity must be in"),
        ({"pattern": "4:4"}, "0 < N < M"),
        ({"pattern": "2:4", "sparsity": 0.7}, "implies sparsity"),
        ({"pattern": "3:7", "sparsity": None}, "not divisible"),
        ({"nsamples": 0}, "at least 1"),
        ({"seqlen": 100000}, "longer than the model's context"),
        ({"method": "nope"}, "unknown pruning method"),
        ({"calib": "/no/such/file.txt"}, "text file not found"),
    ]:
        with pytest.raises(SparseLLMError, match=message):
            sparsellm.prune(model, tokenizer, **({"method": "wanda", "sparsity": 0.5} | kwargs))


def _squared_input_norms(model, tokens) -> dict[str, torch.Tensor]:
    """sum of x_j^2 over all tokens, per linear layer of every block, from one plain forward."""
    prefix, blocks = decoder_blocks(model)
    norms: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            norms[name] = norms.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).square().sum(0)
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for i, block in enumerate(blocks) for name, module in linear_layers(block, f"{prefix}.{i}").items()]
    with torch.no_grad():
        model(tokens, use_cache=False)
    for hook in hooks:
        hook.remove()
    return norms


def _wanda_reference(model, tokens, sparsity, calibration_inputs):
    """Wanda from plain full-model forwards: block by block, each block's layer inputs measured on the
    dense model ("dense"), or on the model whose earlier blocks are already pruned ("pruned"); then
    per row the int(C * s) lowest |W| * ||X_j|| are zeroed."""
    prefix, blocks = decoder_blocks(model)
    norms = _squared_input_norms(model, tokens)
    for index, block in enumerate(blocks):
        if calibration_inputs == "pruned":
            norms = _squared_input_norms(model, tokens)
        for name, module in linear_layers(block, f"{prefix}.{index}").items():
            weight = weight_matrix(module)
            scores = weight.abs() * norms[name].sqrt()
            lowest = scores.argsort(dim=1)[:, : int(weight.shape[1] * sparsity)]
            module.weight.data.scatter_(1, lowest, 0.0)


@pytest.mark.parametrize("calibration_inputs", ["dense", "pruned"])
def test_wanda_calibration_inputs_match_plain_forwards(llama_folder, calibration_inputs):
    model, tokenizer = load_model(llama_folder)
    reference, _ = load_model(llama_folder)
    report = sparsellm.prune(model, tokenizer, method="wanda", sparsity=0.5, nsamples=6, seqlen=48, batch_size=4,
                             calibration_inputs=calibration_inputs)
    assert report.options["calibration_inputs"] == calibration_inputs
    from sparsellm.weights.oneshot import calibration_windows

    tokens, _ = calibration_windows(reference, tokenizer, nsamples=6, seqlen=48)
    _wanda_reference(reference, tokens, 0.5, calibration_inputs)
    for (name, expected), (_, actual) in zip(reference.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(expected == 0, actual == 0), name
    # the two modes really differ: blocks after the first see other activations
    other, _ = load_model(llama_folder)
    sparsellm.prune(other, tokenizer, method="wanda", sparsity=0.5, nsamples=6, seqlen=48,
                    calibration_inputs={"dense": "pruned", "pruned": "dense"}[calibration_inputs])
    last = model.model.layers[-1].mlp.down_proj.weight
    assert not torch.equal(last == 0, other.model.layers[-1].mlp.down_proj.weight == 0)


def test_calibration_inputs_must_be_known(llama_folder):
    model, tokenizer = load_model(llama_folder)
    with pytest.raises(SparseLLMError, match="calibration inputs must be dense or pruned"):
        sparsellm.prune(model, tokenizer, method="wanda", sparsity=0.5, calibration_inputs="both")
