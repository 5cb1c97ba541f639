"""The layer-by-layer engine: captured inputs, shared statistics, offloading, on five model families."""

import torch

from sparsellm import engine
from sparsellm.data import load_text, token_windows
from sparsellm.models import decoder_blocks, final_norm, linear_layers, load_model
from sparsellm.weights import InputStatistics
from sparsellm.weights.base import HESSIAN, NORMS
from tiny import make_model, make_tokenizer, save_tiny


def windows(tokenizer, count=6, seqlen=32):
    return token_windows(tokenizer, load_text("builtin", "calibration"), seqlen, count)


def test_walking_blocks_reproduces_the_model(arch):
    """Running the captured inputs through every block gives the model's own last hidden state."""
    model = make_model(arch)
    tokens = windows(make_tokenizer(arch == "gemma3"))
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True, use_cache=False).hidden_states[-1]
        for step in engine.walk(model, tokens, batch_size=4):
            assert step.block is decoder_blocks(model)[1][step.index]
        hidden = torch.cat(step.activations.hidden)
        norm = final_norm(model)
        torch.testing.assert_close(norm(hidden), expected, rtol=1e-4, atol=1e-4)


def test_collected_statistics_equal_a_plain_forward(arch):
    """One pass with early stop and shared accumulators gives each layer exactly its own inputs."""
    model = make_model(arch)
    tokens = windows(make_tokenizer(arch == "gemma3"))
    prefix, blocks = decoder_blocks(model)
    expected: dict[str, torch.Tensor] = {}
    hooks = []
    for index, block in enumerate(blocks):
        for name, module in linear_layers(block, f"{prefix}.{index}").items():
            def hook(module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])
                expected[name] = expected.get(name, 0) + x.t() @ x
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(tokens, use_cache=False)
    for hook in hooks:
        hook.remove()

    needs = frozenset({HESSIAN, NORMS})
    for step in engine.walk(model, tokens, batch_size=4):
        stats = step.collect(lambda name, module: InputStatistics(module.weight.shape[-1] if type(module).__name__
                                                                  != "Conv1D" else module.weight.shape[0], needs))
        assert set(stats) == set(step.layers)
        for name, stat in stats.items():
            gram = torch.triu(stat.hessian) + torch.triu(stat.hessian, 1).t()
            torch.testing.assert_close(gram, expected[name], rtol=1e-4, atol=1e-3)
            assert stat.samples == len(tokens)


def test_offloaded_model_prunes_like_an_in_memory_one(tmp_path):
    import sparsellm

    folder = save_tiny(tmp_path / "tiny", "llama", layers=3)
    reference, tokenizer = load_model(folder)
    sparsellm.prune(reference, tokenizer, method="sparsegpt", sparsity=0.5, nsamples=4, seqlen=32)

    offloaded, _ = load_model(folder, offload_folder=tmp_path / "offload", max_memory={"cpu": "40KB"})
    assert any(getattr(m, "_hf_hook", None) is not None and m._hf_hook.offload for m in offloaded.modules())
    sparsellm.prune(offloaded, tokenizer, method="sparsegpt", sparsity=0.5, nsamples=4, seqlen=32)
    sparsellm.save(offloaded, tokenizer, tmp_path / "out")
    reloaded, _ = load_model(tmp_path / "out")
    for (name, expected), (_, actual) in zip(reference.state_dict().items(), reloaded.state_dict().items(), strict=True):
        torch.testing.assert_close(actual, expected, msg=name)
