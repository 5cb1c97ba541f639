"""The MoE layer against a slow per-token reference, the auxiliary losses against their formulas."""

import itertools
import math
from contextlib import ExitStack
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

from sparsellm.activations.moe import MoEConfig, MoELayer, load_balancing_loss, router_z_loss
from sparsellm.activations.moe.layer import WEIGHTINGS, PackedExperts
from sparsellm.errors import SparseLLMError
from sparsellm.kernels.backend import cpu_isas, extension, use_backend
from sparsellm.kernels.layouts import pack_down, pack_gate_up, unpack_down, unpack_gate_up

HIDDEN, EXPERT_SIZE = 16, 8


def make_layer(num_experts=4, top_k=1, capacity_factor=None, weighting="softmax", seed=0, **options):
    torch.manual_seed(seed)
    layer = MoELayer(HIDDEN, MoEConfig(num_experts, EXPERT_SIZE, top_k, capacity_factor, weighting, **options))
    with torch.no_grad():  # a wide router so that routing is far from uniform and ties never happen
        layer.router.weight.normal_(0, 1.0)
    return layer.eval()


def reference(layer: MoELayer, x: torch.Tensor):
    """Loop over choice ranks, then tokens in order: each expert serves assignments until it is full."""
    config = layer.moe_config
    w_router = layer.router.weight.detach().double()
    experts = layer.experts.unpacked() if isinstance(layer.experts, PackedExperts) else layer.experts
    gate_up, down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
    tokens = x.shape[0]
    capacity = None if config.capacity_factor is None else \
        max(1, math.ceil(config.capacity_factor * config.top_k * tokens / config.num_experts))
    choices = []
    for t in range(tokens):
        logits = [sum(w_router[e, j].item() * x[t, j].item() for j in range(HIDDEN))
                  for e in range(config.num_experts)]
        total = sum(math.exp(v) for v in logits)
        probs = [math.exp(v) / total for v in logits]
        ranked = sorted(range(config.num_experts), key=lambda e: -probs[e])[: config.top_k]
        chosen = sum(probs[e] for e in ranked)
        if config.weighting == "softmax":
            choices.append([(e, probs[e]) for e in ranked])
        elif config.weighting == "normalized":
            choices.append([(e, probs[e] / chosen) for e in ranked])
        else:
            choices.append([(e, 1.0) for e in ranked])
    served = [0] * config.num_experts
    output = torch.zeros(tokens, HIDDEN, dtype=torch.float64)
    kept = torch.zeros(tokens, config.top_k, dtype=torch.bool)
    for rank in range(config.top_k):
        for t in range(tokens):
            expert, weight = choices[t][rank]
            if capacity is not None and served[expert] >= capacity:
                continue
            served[expert] += 1
            kept[t, rank] = True
            output[t] += weight * expert_reference(gate_up[expert], down[expert], x[t])
    return output, kept, served


def expert_reference(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One expert on one token in float64: down (silu(gate x) * up x)."""
    gate, up = (gate_up.double() @ x.double()).chunk(2)
    return down.double() @ (F.silu(gate) * up)


# the dispatch limit that forces each torch path: one product per expert, or the padded batch
DISPATCHES = {"per expert": 0.0, "padded batch": math.inf}


def forced_dispatch(name: str, layer: MoELayer) -> ExitStack:
    """Run an inference call on one path: a torch dispatch, or the compiled kernel on the layer's experts
    packed (``compiled``: with AVX-512 where the CPU has it; ``compiled avx2``: the AVX2 / plain build),
    which must then be taken."""
    stack = ExitStack()
    if name in DISPATCHES:
        stack.enter_context(patch.object(MoELayer, "_kernels", return_value=None))
        stack.enter_context(patch("sparsellm.activations.moe.layer.PADDED_DISPATCH_LIMIT", DISPATCHES[name]))
        return stack
    if extension() is None:
        pytest.skip("the kernels' extension did not build")
    if name == "compiled avx2" and "avx2" not in cpu_isas():
        pytest.skip("this CPU has no AVX2")
    layer.pack_()
    stack.enter_context(use_backend("avx2" if name == "compiled avx2" else "auto"))
    stack.enter_context(patch.object(MoELayer, "dispatch", side_effect=AssertionError("not the compiled path")))
    return stack


@pytest.mark.parametrize("dispatch", [*DISPATCHES, "compiled", "compiled avx2"])
@pytest.mark.parametrize("weighting", ["softmax", "normalized", "ones"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_layer_equals_per_token_reference(top_k, capacity_factor, weighting, dispatch):
    layer = make_layer(num_experts=5, top_k=top_k, capacity_factor=capacity_factor, weighting=weighting)
    x = torch.randn(23, HIDDEN)
    expected, kept, served = reference(layer, x)
    with torch.no_grad(), forced_dispatch(dispatch, layer):
        output = layer(x)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    routing = layer.last_routing
    if capacity_factor is None:
        assert routing.kept is None
    else:
        assert torch.equal(routing.kept, kept)
        if capacity_factor == 0.5:
            assert not kept.all()  # the case really drops tokens
    assert routing.expert_counts().tolist() == served


def test_dropped_tokens_get_zero_and_keep_their_shape():
    """A capacity of one assignment per expert: only the first token choosing each expert runs."""
    layer = make_layer(num_experts=2, top_k=1, capacity_factor=1e-9)
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        output = layer(x)
    assert output.shape == x.shape
    flat_experts = layer.last_routing.experts[:, 0].tolist()
    ran = [flat_experts.index(e) for e in set(flat_experts)]
    for t in range(10):
        assert (output.reshape(10, HIDDEN)[t].abs().sum() > 0) == (t in ran)


def test_batched_input_equals_flattened_and_single_tokens_route_alike():
    layer = make_layer(num_experts=6, top_k=2)
    x = torch.randn(3, 7, HIDDEN)
    with torch.no_grad():
        batched = layer(x)
        flat = layer(x.reshape(-1, HIDDEN))
        single = torch.cat([layer(x.reshape(-1, HIDDEN)[t : t + 1]) for t in range(21)])
    torch.testing.assert_close(batched.reshape(-1, HIDDEN), flat)
    torch.testing.assert_close(single, flat, rtol=1e-5, atol=1e-6)


def test_routing_is_deterministic_and_float32():
    layer = make_layer(num_experts=8, top_k=2, jitter=0.1).to(torch.bfloat16)
    x = torch.randn(40, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        first = layer(x)
        experts = layer.last_routing.experts.clone()
        second = layer(x)
    assert layer.last_routing.logits.dtype == torch.float32 and first.dtype == torch.bfloat16
    assert torch.equal(experts, layer.last_routing.experts) and torch.equal(first, second)


def test_jitter_only_in_training():
    layer = make_layer(num_experts=8, top_k=1, jitter=0.5).train()
    x = torch.randn(200, HIDDEN)
    logits = [layer.route(x).logits for _ in range(2)]
    assert not torch.equal(logits[0], logits[1])
    clean = F.linear(x, layer.router.weight)
    # each input entry is scaled by U(0.5, 1.5): the logits move, but far less than their own size
    assert 0 < (logits[0] - clean).abs().mean() < 0.5 * clean.abs().mean()
    layer.eval()
    torch.testing.assert_close(layer.route(x).logits, clean)


def test_capacity_formula():
    assert MoEConfig(4, 8, top_k=2, capacity_factor=1.25).capacity(10) == 7  # ceil(1.25 * 2 * 10 / 4)
    assert MoEConfig(8, 8, top_k=1, capacity_factor=1.0).capacity(256) == 32
    assert MoEConfig(8, 8, top_k=1, capacity_factor=0.01).capacity(3) == 1
    assert MoEConfig(8, 8).capacity(100) is None


def test_load_balancing_loss_equals_formula():
    torch.manual_seed(1)
    probs = torch.randn(30, 5).softmax(-1)
    experts = probs.topk(2, dim=-1).indices
    f = [sum(int(e == i) for e in experts.reshape(-1).tolist()) / experts.numel() for i in range(5)]
    p = [probs[:, i].mean().item() for i in range(5)]
    expected = 5 * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    assert load_balancing_loss(probs, experts).item() == pytest.approx(expected, rel=1e-6)
    # perfectly balanced: 1; everything on one expert with certainty: N
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, torch.arange(8).remainder(4).unsqueeze(1)).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), 4).float()
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)).item() == pytest.approx(4.0)


def test_z_loss_equals_formula():
    logits = torch.randn(12, 6) * 3
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 12
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("weighting", ["softmax", "normalized", "ones"])
def test_gradients_reach_the_router(weighting, dispatch):
    layer = make_layer(num_experts=4, top_k=2, weighting=weighting).train()
    x = torch.randn(32, HIDDEN)
    with patch("sparsellm.activations.moe.layer.PADDED_DISPATCH_LIMIT", DISPATCHES[dispatch]):
        output = layer(x)
    routing = layer.last_routing
    aux = load_balancing_loss(routing.probs, routing.experts) + router_z_loss(routing.logits)
    aux.backward(retain_graph=True)
    assert layer.router.weight.grad.abs().sum() > 0
    layer.router.weight.grad = None
    output.square().sum().backward()
    grad = layer.router.weight.grad
    if weighting == "softmax":  # the output itself depends on the router's probabilities
        assert grad is not None and grad.abs().sum() > 0
    assert layer.experts.gate_up_proj.grad.abs().sum() > 0


@pytest.mark.parametrize(("options", "message"), [
    ({"top_k": 5}, "top-k must be between 1 and"),
    ({"capacity_factor": 0.0}, "capacity factor must be positive"),
    ({"weighting": "max"}, "unknown expert weighting"),
    ({"jitter": 1.5}, "jitter must be in"),
])
def test_bad_config_is_one_line(options, message):
    with pytest.raises(SparseLLMError, match=message):
        MoEConfig(4, 8, **options)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("tokens", [1, 6])
def test_only_the_chosen_experts_weights_are_used(tokens, packed):
    """Poison every expert no token chose: the output does not change, so their weights were never read."""
    layer = make_layer(num_experts=8, top_k=2)
    if packed:
        layer.pack_()
    x = torch.randn(tokens, HIDDEN)
    with torch.no_grad():
        expected = layer(x)
        chosen = set(layer.last_routing.experts.reshape(-1).tolist())
        for expert in set(range(8)) - chosen:
            for weights in layer.experts.buffers() if packed else layer.experts.parameters():
                weights[expert] = float("nan")
        assert torch.equal(layer(x), expected)
    if not packed:
        assert layer.experts.gate_up_proj[3].is_contiguous() and layer.experts.down_proj[3].is_contiguous()


@pytest.mark.skipif(extension() is None, reason="the kernels' extension did not build")
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("top_k", [1, 2, 6])
@pytest.mark.parametrize("router_bias", [False, True])
def test_one_token_compiled_path_equals_reference(top_k, weighting, router_bias):
    """Decoding (one token, inference, float32) routes and runs the experts in one compiled call:
    the same output as the per-token reference, the same routing as ``route``."""
    layer = make_layer(num_experts=6, top_k=top_k, weighting=weighting, router_bias=router_bias)
    with torch.no_grad():
        layer.router.weight.mul_(0.3)  # softer routing: the weights differ from 1 and from each other
        if router_bias:
            layer.router.bias.normal_(0, 1.0)
    layer.pack_()
    for _ in range(5):
        x = torch.randn(1, HIDDEN)
        with torch.no_grad(), patch.object(MoELayer, "route", side_effect=AssertionError("not the compiled path")):
            output = layer(x)
        compiled = layer.last_routing
        with torch.no_grad():
            routed = layer.route(x)
        assert torch.equal(compiled.experts, routed.experts) and compiled.kept is None
        for name in ("logits", "probs", "weights"):
            torch.testing.assert_close(getattr(compiled, name), getattr(routed, name), rtol=1e-5, atol=1e-6)
        if not router_bias:  # the reference has no router bias
            expected, _, _ = reference(layer, x)
            torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
        with patch.object(MoELayer, "_kernels", return_value=None), torch.no_grad():
            torch.testing.assert_close(output, layer(x), rtol=1e-5, atol=1e-6)


def test_dispatch_paths_give_the_same_gradients():
    """Training through the padded batch or one product per expert: the same gradients everywhere."""
    gradients = []
    for limit in DISPATCHES.values():
        layer = make_layer(num_experts=4, top_k=2, capacity_factor=1.0, weighting="softmax").train()
        x = torch.randn(32, HIDDEN, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with patch("sparsellm.activations.moe.layer.PADDED_DISPATCH_LIMIT", limit):
            layer(x).square().sum().backward()
        gradients.append([x.grad, *(p.grad for p in layer.parameters())])
    for per_expert, padded in zip(*gradients, strict=True):
        torch.testing.assert_close(padded, per_expert, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(extension() is None, reason="the kernels' extension did not build")
@pytest.mark.parametrize("backend", ["auto", "avx2"])
@pytest.mark.parametrize(("hidden", "expert_size", "num_experts", "top_k", "tokens"),
                         [(37, 5, 3, 2, 7), (130, 13, 16, 8, 33), (64, 96, 8, 1, 256), (2048, 9, 4, 4, 5)])
def test_compiled_experts_equal_the_products_they_replace(hidden, expert_size, num_experts, top_k, tokens, backend):
    """The kernel of many tokens (kernels/csrc/moe.cpp, moe_experts) against float64 products of the same
    weights, with dropped assignments (-1): sizes that leave partial panels of neurons (5, 13, 9) and
    outputs (37, 130) and partial groups of tokens, several passes over a panel (2048 columns), one
    expert with no token, a full batch."""
    if backend == "avx2" and "avx2" not in cpu_isas():
        pytest.skip("this CPU has no AVX2")
    generator = torch.Generator().manual_seed(hidden)
    x = torch.randn(tokens, hidden, generator=generator)
    gate_up = torch.randn(num_experts, 2 * expert_size, hidden, generator=generator) / hidden ** 0.5
    down = torch.randn(num_experts, hidden, expert_size, generator=generator) / expert_size ** 0.5
    experts = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    if top_k == 1:
        experts[experts == num_experts - 1] = 0  # the last expert gets no token
    experts[torch.rand(tokens, top_k, generator=generator) < 0.2] = -1
    weights = torch.rand(tokens, top_k, generator=generator)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t, j in itertools.product(range(tokens), range(top_k)):
        e = experts[t, j].item()
        if e >= 0:
            expected[t] += weights[t, j].double() * expert_reference(gate_up[e], down[e], x[t])
    with use_backend(backend):
        got = extension().moe_experts(x, experts, weights, pack_gate_up(gate_up), pack_down(down), backend != "avx2")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("hidden", "expert_size"), [(16, 8), (37, 5), (130, 13)])
def test_packing_is_a_permutation_with_zero_padding(hidden, expert_size):
    """Every weight lands where moe.cpp reads it (panel p, row k, column n), the padding is zero, and
    unpacking gives the tensors back exactly."""
    gate_up, down = torch.randn(3, 2 * expert_size, hidden), torch.randn(3, hidden, expert_size)
    gate_up_panels, down_panels = pack_gate_up(gate_up), pack_down(down)
    assert gate_up_panels.shape == (3, -(-expert_size // 8), hidden, 16)
    assert down_panels.shape == (3, -(-hidden // 16), expert_size, 16)
    for e, f, h in itertools.product(range(3), range(expert_size), range(hidden)):
        assert gate_up_panels[e, f // 8, h, f % 8] == gate_up[e, f, h]
        assert gate_up_panels[e, f // 8, h, 8 + f % 8] == gate_up[e, expert_size + f, h]
        assert down_panels[e, h // 16, f, h % 16] == down[e, h, f]
    assert gate_up_panels.abs().sum() == pytest.approx(gate_up.abs().sum().item(), rel=1e-6)
    assert down_panels.abs().sum() == pytest.approx(down.abs().sum().item(), rel=1e-6)
    for unpacked, original in ((unpack_gate_up(gate_up_panels, expert_size), gate_up), (unpack_down(down_panels, hidden), down)):
        assert torch.equal(unpacked, original) and unpacked.is_contiguous()  # safetensors saves only contiguous tensors


def test_packed_layer_saves_and_loads_as_the_unpacked_one():
    layer = make_layer(num_experts=5, top_k=2)
    unpacked = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    layer.pack_()
    assert not list(layer.experts.parameters())
    saved = layer.state_dict()
    assert saved.keys() == unpacked.keys()
    for name, tensor in unpacked.items():
        assert torch.equal(saved[name], tensor), name
    other = make_layer(num_experts=5, top_k=2, seed=1).pack_()
    other.load_state_dict(unpacked)
    x = torch.randn(9, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(other(x), layer(x))
        layer.unpack_()
        torch.testing.assert_close(layer(x), other(x), rtol=1e-5, atol=1e-6)
    assert layer.experts.gate_up_proj.requires_grad


def test_packed_layer_refuses_to_train_and_runs_without_the_kernels():
    layer = make_layer(num_experts=4, top_k=2).pack_()
    x = torch.randn(7, HIDDEN)
    with torch.no_grad():
        expected = layer(x)
        with use_backend("torch"), patch.object(MoELayer, "dispatch", autospec=True, side_effect=MoELayer.dispatch) as torch_path:
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        assert torch_path.called
    with pytest.raises(SparseLLMError, match="packed for inference"):
        layer.train()(x)
    with pytest.raises(SparseLLMError, match="SiLU-gated experts; this layer's use gelu"):
        make_layer(activation="gelu_pytorch_tanh").pack_()


@pytest.mark.skipif(extension() is None, reason="the kernels' extension did not build")
@pytest.mark.parametrize("backend", ["auto", "avx2"])
def test_compiled_silu_holds_over_the_whole_float_range(backend):
    """The kernel's own exp in SiLU (moe.cpp's exp8), gates from -300 to 300 (past where e^-x
    overflows float32) and near zero, each neuron alone through the down row, against float64."""
    if backend == "avx2" and "avx2" not in cpu_isas():
        pytest.skip("this CPU has no AVX2")
    gates = torch.cat([torch.linspace(-300, 300, 56), torch.linspace(-1e-4, 1e-4, 8)])
    gate_up = torch.cat([gates, torch.ones(64)]).view(1, 128, 1)  # x = 1: gate = the weight, up = 1
    one_token, first_expert = torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long)
    for index, gate in enumerate(gates.tolist()):
        down = torch.zeros(1, 1, 64)
        down[0, 0, index] = 1.0
        with use_backend(backend):
            got = extension().moe_experts(one_token, first_expert, torch.ones(1, 1), pack_gate_up(gate_up),
                                          pack_down(down), backend != "avx2")
        assert got.item() == pytest.approx(F.silu(torch.tensor(gate, dtype=torch.float64)).item(), rel=2e-6, abs=1e-30)
