"""Decoding a token through a Llama-shaped decoder layer in direct calls (kernels/decoder.py): the
logits of transformers' own layer forward on the same modules, bit for bit, and that forward
wherever the direct calls would change or skip something."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP

import sparsellm
from sparsellm import attention
from sparsellm.kernels import backend, cache_argument, use_kernels
from sparsellm.kernels.decoder import DirectDecode
from sparsellm.models import load_model

pytestmark = pytest.mark.skipif(backend.extension() is None, reason="the kernels' extension did not build")


def pruned_on_kernels(folder, kernels="auto"):
    model, tokenizer = load_model(folder)
    sparsellm.prune(model, tokenizer, method="magnitude", sparsity=0.5)
    return model, use_kernels(model, kernels, dense_layers=True)


@torch.no_grad()
def decoded_logits(model, steps=8, cache="growing", **inputs):
    """The last logits of a prompt and of ``steps`` greedily decoded tokens after it, stacked."""
    argument = cache_argument(model, cache)
    step = inputs.pop("input_ids", torch.tensor([[5, 17, 92, 41, 230, 8]]))
    mask = inputs.pop("attention_mask", None)
    logits = []
    for _ in range(steps + 1):
        last = model(input_ids=step, attention_mask=mask, use_cache=True, **argument, **inputs).logits[:, -1]
        logits.append(last)
        step = last.argmax(-1, keepdim=True)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(step)], 1)
    return torch.stack(logits, 1)


def own_forward(model):
    """The same model with its layers' own forward (DirectDecode removed)."""
    for layer in model.model.layers:
        layer.__dict__.pop("forward", None)
    return model


@pytest.fixture
def own_forward_calls(monkeypatch):
    """Counts the calls of the Llama layers' own forward (DirectDecode's way out included)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    calls, forward = [], LlamaDecoderLayer.forward
    monkeypatch.setattr(LlamaDecoderLayer, "forward",
                        lambda self, hidden_states, *args, **kwargs: calls.append(hidden_states.shape[1])
                        or forward(self, hidden_states, *args, **kwargs))
    return calls


@pytest.mark.parametrize("cache", ["growing", "dynamic"])
@pytest.mark.parametrize("kernels", ["auto", "sparse"])
def test_same_logits_as_the_layers_own_forward(llama_folder, cache, kernels, own_forward_calls):
    model, report = pruned_on_kernels(llama_folder, kernels)
    layers = model.model.layers
    assert report.decode_layers == len(layers) == 3
    assert all(isinstance(layer.__dict__.get("forward"), DirectDecode) for layer in layers)
    assert "3 decoder layers decode in direct calls" in report.describe()
    own_forward_calls.clear()
    got = decoded_logits(model, cache=cache)
    assert own_forward_calls == [6] * len(layers)  # the prompt only: every decoded token went direct
    assert torch.equal(got, decoded_logits(own_forward(model), cache=cache))


def test_hooks_see_every_token(llama_folder, own_forward_calls):
    model, _ = pruned_on_kernels(llama_folder)
    expected = decoded_logits(model)
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda module, inputs, output: seen.append(1))
    own_forward_calls.clear()
    got = decoded_logits(model)
    handle.remove()
    # the hooked layer takes its own forward for every token, the others only for the prompt
    assert len(seen) == 9 and own_forward_calls == [6, 6, 6] + [1] * 8
    assert torch.equal(got, expected)


def test_masks_training_and_other_attention_take_the_layers_own_forward(llama_folder, own_forward_calls):
    model, _ = pruned_on_kernels(llama_folder)
    padded = {"input_ids": torch.tensor([[0, 0, 5, 17, 92, 41], [5, 17, 92, 41, 230, 8]]),
              "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])}
    cases = {"padding mask": lambda: decoded_logits(model, steps=3, **padded),
             "training": lambda: decoded_logits(model.train(), steps=3),
             "window attention": lambda: decoded_logits(model.eval(), steps=3)}
    for name, run in cases.items():
        if name == "window attention":
            attention.apply(model, "window", window=4)
        own_forward_calls.clear()
        got = run()
        assert len(own_forward_calls) == 3 * 4, name  # the prompt and each of the 3 tokens
        own_forward(model)
        assert torch.equal(got, run()), name
        for layer in model.model.layers:
            layer.forward = DirectDecode(layer)


def test_a_different_mlp_keeps_the_layers_own_forward(llama_folder):
    class SwappedMLP(LlamaMLP):  # the same modules, the activation on the other branch
        def forward(self, x):
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    model, _ = load_model(llama_folder)
    for layer in model.model.layers:
        layer.mlp.__class__ = SwappedMLP
    expected = decoded_logits(model, steps=3)
    report = use_kernels(model, "sparse", dense_layers=True)
    assert report.rotary_attention == 3 and report.decode_layers == 0
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)
    torch.testing.assert_close(decoded_logits(model, steps=3), expected, rtol=1e-4, atol=1e-4)
