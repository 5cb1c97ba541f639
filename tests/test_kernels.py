"""Every kernel equals the dense product of the same masked (dequantized) weights.

References are plain ``x @ W.T`` on a dense float32 matrix built independently of the layouts.
Each case runs on every backend this machine has: the compiled AMX, AVX-512 and AVX2 kernels (the
lesser ones forced on CPUs that have more) and the PyTorch fallback. AMX tiles take row-major bfloat16
weights from 6 tokens on (here: 17 and 32 tokens in test_float_formats, test_bfloat16_activations,
the random shapes).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsellm.errors import SparseLLMError
from sparsellm.kernels import Quantization, SparseLinear, backend, build, reference, use_backend
from sparsellm.kernels.layouts import complete_24, pack_bits, unpack_bits

BACKENDS = [*backend.cpu_isas(), "torch"]


def random_weight(rows, cols, sparsity, generator, empty=True):
    weight = torch.randn(rows, cols, generator=generator)
    weight[torch.rand(rows, cols, generator=generator) < sparsity] = 0
    if empty and rows > 2 and cols > 2:
        weight[rows // 2] = 0  # an empty row
        weight[:, cols // 3] = 0  # an empty column
        weight[0] = torch.randn(cols, generator=generator)  # a full row
    return weight


def two_four(weight):
    """Keep the two largest of every four columns (``weight`` columns a multiple of 4)."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 4, 4)
    kept = groups.abs().topk(2, -1).indices
    return torch.zeros_like(groups).scatter(-1, kept, groups.gather(-1, kept)).reshape(rows, cols)


def run(layer, x):
    with torch.no_grad():
        return layer(x)


def check(actual, expected, tolerance=2e-5, scale=None):
    """Max error relative to ``scale`` (default: the largest expected value; for sums that cancel,
    pass the sum of |terms|, which bounds a float32 dot product's rounding)."""
    scale = (expected.abs().max().item() if scale is None else scale) + 1e-6
    error = (actual.float() - expected.float()).abs().max().item() / scale
    assert error < tolerance, f"relative error {error:.2e}"


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "bitmask", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_formats(name, form, dtype):
    generator = torch.Generator().manual_seed(1)
    for rows, cols, batch in [(1, 4, 1), (67, 132, 3), (300, 2500, 2), (130, 4100, 32), (70, 700, 17)]:
        weight = random_weight(rows, cols, 0.6, generator)
        if form == "2:4":
            weight = two_four(weight)
        weight = weight.to(dtype)
        bias = torch.randn(rows, generator=generator)
        x = torch.randn(batch, cols, generator=generator)
        with use_backend(name):
            layer = SparseLinear.from_dense(weight, bias, format=form, dtype=None, dispatch="sparse")
            check(run(layer, x), x @ weight.float().t() + bias)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "bitmask", "2:4"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_formats(name, form, bits):
    generator = torch.Generator().manual_seed(2)
    for rows, cols, batch, group in [(5, 64, 1, 64), (70, 300, 5, 128), (129, 2200, 2, 0)]:
        keep = random_weight(rows, cols, 0.55, generator) != 0
        if form == "2:4":
            keep = two_four(torch.where(keep, torch.rand(rows, cols, generator=generator) + 1, 0.0)) != 0
        if form == "dense":
            keep = torch.ones_like(keep)
        codes = torch.randint(0, 2**bits, (rows, cols), generator=generator, dtype=torch.uint8)
        groups = -(-cols // group) if group else 1
        quantization = Quantization(bits, group, torch.rand(rows, groups, generator=generator).half() + 0.01,
                                    torch.randint(0, 2**bits, (rows, groups), generator=generator, dtype=torch.uint8))
        dense = quantization.dequantize(codes) * keep  # independent of the layout code
        x = torch.randn(batch, cols, generator=generator)
        with use_backend(name):
            layer = SparseLinear.from_dense(codes, keep=keep, format=form, quantization=quantization, dispatch="sparse")
            check(run(layer, x), x @ dense.t())
            activation = SparseLinear.from_dense(codes, keep=keep, format=form, quantization=quantization,
                                                 threshold=0.5, dispatch="sparse")
            check(run(activation, x), (x * (x.abs() > 0.5)) @ dense.t())


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("form", ["dense", "bitmask", "2:4"])
def test_activation_sparsity(name, form):
    generator = torch.Generator().manual_seed(3)
    # (2500, 301, 9): more tokens than a GEMV group, over several blocks of 512 outputs
    for rows, cols, batch in [(1, 1, 1), (77, 190, 1), (2100, 300, 4), (64, 3000, 11), (2500, 301, 9)]:
        weight = random_weight(rows, cols, 0.5, generator).to(torch.bfloat16)
        if form == "2:4":
            weight = two_four(torch.nn.functional.pad(weight, (0, -cols % 4)))[:, :cols]
        x = torch.randn(batch, cols, generator=generator)
        x[:, : cols // 4] = 0  # whole inputs that no token needs
        with use_backend(name):
            layer = SparseLinear.from_dense(weight, format=form, threshold=0.7, dispatch="sparse")
            assert layer.layout.input_major
            check(run(layer, x), (x * (x.abs() > 0.7)) @ weight.float().t())


@pytest.mark.parametrize("name", BACKENDS)
def test_bfloat16_activations(name):
    """bfloat16 inputs and outputs: the result is the float32 product rounded once to bfloat16."""
    generator = torch.Generator().manual_seed(4)
    weight = random_weight(200, 700, 0.5, generator).to(torch.bfloat16)
    x = torch.randn(6, 700, generator=generator).to(torch.bfloat16)
    expected = x.float() @ weight.float().t()
    with use_backend(name):
        for form in ("bitmask", "dense"):
            for threshold in (None, 0.3):
                layer = SparseLinear.from_dense(weight, format=form, threshold=threshold, dispatch="sparse")
                result = run(layer, x)
                assert result.dtype == torch.bfloat16
                reference = expected if threshold is None else (x.float() * (x.float().abs() > 0.3)) @ weight.float().t()
                check(result, reference, tolerance=8e-3)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bias_and_output_dtype(name, dtype):
    """The sparse kernels write the output themselves: in the inputs' dtype and shape, the float32
    product plus the bias rounded once. 1100 rows: threads split them (rows) or the inputs (input-major)."""
    generator = torch.Generator().manual_seed(12)
    weight = random_weight(1100, 330, 0.5, generator).to(torch.bfloat16)
    bias = torch.randn(1100, generator=generator).to(dtype)  # the model's, in its dtype
    for shape in ((1, 1, 330), (3, 330), (2, 2, 330)):
        x = torch.randn(shape, generator=generator).to(dtype)
        for threshold in (None, 0.3):
            kept = x.float() if threshold is None else x.float() * (x.float().abs() > 0.3)
            expected = (kept @ weight.float().t() + bias.float()).to(dtype)
            with use_backend(name):
                layer = SparseLinear.from_dense(weight, bias, threshold=threshold, dispatch="sparse")
                result = run(layer, x)
            assert result.dtype == dtype and result.shape == (*shape[:-1], 1100)
            # a float32 sum in another order differs by a few float32 rounding errors of its terms,
            # and may then round the other way: one unit in the last place of the result's dtype
            terms = kept.abs() @ weight.float().abs().t() + bias.float().abs()
            allowed = torch.finfo(dtype).eps * expected.float().abs() + 1e-6 * terms
            assert ((result.float() - expected.float()).abs() <= allowed).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_outputs_round_as_torch(name):
    """With an identity matrix the output is x + bias summed in float32, exactly: its rounding to
    bfloat16 / float16 must be torch's, bit for bit (ties to even, overflow to inf, NaN kept)."""
    generator = torch.Generator().manual_seed(13)
    for dtype in (torch.bfloat16, torch.float16):
        big = torch.finfo(dtype).max
        x = torch.randn(3, 64, generator=generator).to(dtype)
        x[0, :4] = torch.tensor([1.0, 1.0, big, -big])
        bias = torch.randn(64, generator=generator).to(dtype)
        # 1 + 2^-8 (bfloat16) / 2^-11 (float16): halfway between two values, rounds to even; then
        # overflow on both sides, and NaN
        bias[:5] = torch.tensor([torch.finfo(dtype).eps / 2, 3 * torch.finfo(dtype).eps / 2, big, -big, float("nan")])
        with use_backend(name):
            layer = SparseLinear.from_dense(torch.eye(64).to(dtype), bias, dispatch="sparse")
            result = run(layer, x)
        torch.testing.assert_close(result, (x.float() + bias.float()).to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", BACKENDS)
def test_dense_path_for_many_tokens(name):
    """kernels="auto" switches to the GEMM on decoded blocks past the crossover: same results."""
    generator = torch.Generator().manual_seed(5)
    weight = two_four(random_weight(300, 520, 0.5, generator))
    x = torch.randn(40, 520, generator=generator)
    with use_backend(name):
        for form in ("bitmask", "2:4"):
            for threshold in (None, 0.4):
                layer = SparseLinear.from_dense(weight, format=form, dtype=torch.float32, threshold=threshold)
                layer.crossover = {torch.float32: 8, torch.bfloat16: 8}
                for inputs, tolerance in ((x, 2e-5), (x.to(torch.bfloat16), 8e-3)):
                    kept = inputs.float() if threshold is None else inputs.float() * (inputs.float().abs() > 0.4)
                    check(run(layer, inputs), kept @ weight.t(), tolerance)


@pytest.mark.parametrize("name", BACKENDS)
def test_dense_path_in_blocks_and_panels(name):
    """A matrix the dense path cuts into several blocks of rows and panels of columns: 2100 x 4200,
    row-major (4 blocks of 525 rows, panels of 2048 + 2048 + 104 columns) and input-major (the sum
    cut in 2 blocks of 2100 inputs, 2 panels of outputs), stored dense or bitmask."""
    generator = torch.Generator().manual_seed(11)
    weight = random_weight(2100, 4200, 0.5, generator).to(torch.bfloat16)
    x = torch.randn(24, 4200, generator=generator).to(torch.bfloat16)
    with use_backend(name):
        for form in ("dense", "bitmask"):
            for threshold in (None, 0.4):
                layer = SparseLinear.from_dense(weight, format=form, threshold=threshold)
                layer.crossover = {torch.bfloat16: 8}
                kept = x.float() if threshold is None else x.float() * (x.float().abs() > 0.4)
                check(run(layer, x), kept @ weight.float().t(), tolerance=8e-3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 90), cols=st.integers(1, 330), batch=st.integers(1, 32),
       sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_random_shapes_all_backends_agree(rows, cols, batch, sparsity, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = random_weight(rows, cols, sparsity, generator, empty=False).to(torch.bfloat16)
    x = torch.randn(batch, cols, generator=generator)
    expected = x @ weight.float().t()
    terms = (x.abs() @ weight.float().abs().t()).max().item()  # a 1-row product may cancel to near 0
    for name in BACKENDS:
        with use_backend(name):
            check(run(SparseLinear.from_dense(weight, dispatch="sparse"), x), expected, scale=terms)
            check(run(SparseLinear.from_dense(weight, threshold=0.0, dispatch="sparse"), x), expected, scale=terms)


def test_layout_helpers():
    generator = torch.Generator().manual_seed(6)
    keep = torch.rand(9, 192, generator=generator) < 0.4
    assert torch.equal(unpack_bits(pack_bits(keep), 192), keep)
    words = pack_bits(torch.eye(64, dtype=torch.bool))
    assert words[0, 0] == 1 and words[63, 0] == -(2**63)  # LSB first: column j is bit j
    filled = complete_24(keep[:, :64] & (torch.arange(64) % 2 == 0))
    assert bool((filled.reshape(9, 16, 4).sum(-1) == 2).all())
    with pytest.raises(SparseLLMError, match="not 2:4"):
        complete_24(torch.ones(2, 8, dtype=torch.bool))
    layout = build(torch.randn(10, 100).to(torch.bfloat16), format="bitmask")
    assert layout.cols == 128 and layout.kept == 1000


def test_bytes_follow_sparsity():
    weight = random_weight(512, 1024, 0.5, torch.Generator().manual_seed(7)).to(torch.bfloat16)
    dense = build(weight, format="dense").nbytes
    bitmask = build(weight, format="bitmask").nbytes
    assert 0.5 < bitmask / dense < 0.6  # 9 bits of 16 per weight, plus offsets
    assert 0.5 < build(two_four(weight), format="2:4").nbytes / dense < 0.6


def test_backend_choice():
    assert backend.current().name in BACKENDS
    with use_backend("torch") as chosen:
        assert chosen.name == "torch" and backend.current().name == "torch"
    with pytest.raises(SparseLLMError, match="unknown kernel backend"):
        backend.select("neon")
    for isa in backend.cpu_isas():
        assert backend.self_check(isa) is None


@pytest.mark.skipif(backend.extension() is None, reason="the kernels' extension did not build")
def test_self_check_catches_a_wrong_moe_kernel(monkeypatch):
    """The self-check covers the MoE kernel too: against a reference that differs, it names it."""
    right = reference.moe_experts
    monkeypatch.setattr(reference, "moe_experts", lambda *args: right(*args) * 1.001)
    assert "MoE experts kernel is off by" in backend.self_check(backend.cpu_isas()[0])
