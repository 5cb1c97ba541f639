"""Which implementation runs the kernels: compiled AMX, AVX-512 or AVX2, or the PyTorch fallback.

``amx`` is the AVX-512 kernels plus AMX tiles for products of several tokens with bfloat16 weights
(on CPUs with AMX, where torch's own bfloat16 GEMM uses the tiles too).

The C++ sources in ``csrc/`` are compiled on first use with ``torch.utils.cpp_extension`` and
cached in sparsellm's cache folder (keyed by the sources and the torch version), so later runs
load them in well under a second. The instruction set is chosen at run time from the CPU's flags;
before a compiled backend is used it must reproduce the reference products on small random cases
(``self_check``), so a miscompiled or mis-dispatched kernel can never give silent wrong answers.
``SPARSELLM_KERNELS=amx|avx512|avx2|torch`` or ``use_backend`` forces a backend (tests, benchmarks).
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SparseLLMError
from ..logging_utils import logger
from ..models import cache_dir
from . import reference
from .layouts import Layout, Quantization, build, pack_down, pack_gate_up

SOURCES = ("bindings.cpp", "amx.cpp", "avx512.cpp", "avx2.cpp", "codec.cpp", "crc32.cpp", "moe.cpp")
HEADERS = ("kernels.h",)
ISA_CODES = {"avx2": 2, "avx512": 3, "amx": 4}
BACKENDS = ("amx", "avx512", "avx2", "torch")
CSRC = Path(__file__).parent / "csrc"
FLAGS_VERSION = b"2"  # part of the cache key: bump when the compiler flags change


@dataclass(frozen=True)
class Backend:
    name: str  # "avx512", "avx2" or "torch"
    reason: str  # why it was chosen, for logs and reports


@functools.cache
def build_key() -> str:
    """Identifies the kernels' build: the sources, the compiler flags and the torch version."""
    digest = hashlib.sha256(torch.__version__.encode() + FLAGS_VERSION)
    for name in SOURCES + HEADERS:
        digest.update((CSRC / name).read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def _compiled():
    """The compiled extension module, or the exception that prevented building it."""
    from torch.utils import cpp_extension

    key = build_key()
    build_dir = cache_dir() / "kernels" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=f"sparsellm_kernels_{key}", sources=[str(CSRC / name) for name in SOURCES],
            # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers, serial without it
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"], extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers, a build error: fall back, and say why
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        logger.warning("sparsellm kernels could not be compiled (%s); using the PyTorch fallback", first)
        return exc
    logger.debug("sparsellm kernels ready in %.1f s (%s)", time.perf_counter() - started, build_dir)
    return module


def extension():
    """The compiled module, or None when it could not be built."""
    module = _compiled()
    return None if isinstance(module, Exception) else module


def cpu_isas() -> list[str]:
    """Instruction sets the compiled kernels can use on this CPU, best first."""
    module = extension()
    return list(module.cpu_isas()) if module is not None else []


def compute_dtype() -> torch.dtype:
    """The activations' dtype for a model on the kernels (its weights stay 16-bit): bfloat16 where
    the CPU multiplies bfloat16 in hardware (AVX512_BF16; the Xeons with AMX have it), float32
    elsewhere, where bfloat16 GEMMs and tensor ops are slower than float32 ones. Measured on the Zen
    3 (15 interleaved rounds): the sample's 512-token prefill at 1.06x dense float32 with float32
    activations against 0.96x with bfloat16, decoding equal (1.96x / 1.90x dense bfloat16)."""
    hardware = current().name != "torch" and extension().has_bf16_dot_products()
    return torch.bfloat16 if hardware else torch.float32


def _self_check_cases() -> Iterator[tuple[Layout, torch.Tensor, float | None]]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 200, generator=generator)
    weight[weight.abs() < 0.6] = 0  # about half pruned, with empty rows and columns
    weight[3], weight[:, 7] = 0, 0
    two_four = weight.clone()
    two_four.view(37, 50, 4)[..., 2:] = 0
    codes = torch.randint(0, 16, weight.shape, generator=generator, dtype=torch.uint8)
    quantization = Quantization(4, 64, torch.rand(37, 4, generator=generator).half() + 0.1,
                                torch.randint(0, 16, (37, 4), generator=generator, dtype=torch.uint8))
    x = torch.randn(7, 200, generator=generator)  # 7: the GEMV's groups of 4 and 3 tokens, and AMX tiles
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for form in ("dense", "bitmask", "2:4"):
            matrix = (two_four if form == "2:4" else weight).to(dtype)
            yield build(matrix, format=form, panel=128), x, None
        yield build(weight.to(dtype), format="bitmask", input_major=True), x, 0.5
    for form in ("dense", "bitmask", "2:4"):
        keep = two_four != 0 if form == "2:4" else weight != 0
        yield build(codes, keep, format=form, quantization=quantization, panel=128), x, None
    yield build(codes, weight != 0, format="bitmask", quantization=quantization, input_major=True), x, 0.5
    yield build(codes, weight != 0, format="dense", quantization=Quantization(8, 0, quantization.scale[:, :1],
                                                                             quantization.zero_point[:, :1]),
                input_major=True), x, 0.0


def self_check(isa: str) -> str | None:
    """Compare the compiled kernels for ``isa`` with the reference; None if all agree, else what failed."""
    for layout, x, threshold in _self_check_cases():
        # bfloat16 inputs take other paths (a bfloat16 GEMM on the dense path); results round to bfloat16
        for inputs, tolerance in ((x, 1e-4), (x.to(torch.bfloat16), 1e-2)):
            expected = reference.linear(layout, inputs.float(), threshold)
            scale = expected.abs().max().item() + 1e-6
            for sparse in (True, False):
                got = _compiled_linear(isa, layout, inputs, threshold, sparse, None)
                error = (got.float() - expected).abs().max().item() / scale
                if not error < tolerance:
                    path = "kernel" if sparse else "dense path"
                    return f"{path} for {layout.describe()} with {inputs.dtype} inputs is off by {error:.2e} (relative)"
    # the MoE experts: partial panels of neurons (13) and outputs (37), 2 of 3 experts, one assignment dropped
    generator = torch.Generator().manual_seed(1)
    x, gate_up, down = (torch.randn(shape, generator=generator) for shape in ((9, 37), (3, 26, 37), (3, 37, 13)))
    experts = torch.stack([torch.randperm(3, generator=generator)[:2] for _ in range(9)])
    experts[4, 1] = -1
    weights = torch.rand(9, 2, generator=generator)
    expected = reference.moe_experts(x, experts, weights, gate_up, down)
    got = extension().moe_experts(x, experts, weights, pack_gate_up(gate_up), pack_down(down), isa != "avx2")
    error = (got - expected).abs().max().item() / (expected.abs().max().item() + 1e-6)
    return None if error < 1e-4 else f"the MoE experts kernel is off by {error:.2e} (relative)"


_selected: Backend | None = None


def select(name: str = "auto") -> Backend:
    """Choose the backend: ``auto`` (the best compiled one that passes its self-check, else torch),
    or a named one, which must be available here."""
    global _selected
    if name not in ("auto", *BACKENDS):
        raise SparseLLMError(f"unknown kernel backend '{name}': use auto, {', '.join(BACKENDS)}")
    if name == "torch":
        _selected = Backend("torch", "requested")
        return _selected
    module = extension()
    if module is None:
        if name != "auto":
            raise SparseLLMError(f"the {name} kernels are not available: they could not be compiled here")
        _selected = Backend("torch", f"no compiled kernels: {_compiled()}")
        return _selected
    isas = cpu_isas()
    for isa in [name] if name != "auto" else isas:
        if isa not in isas:
            raise SparseLLMError(f"this CPU cannot run the {isa} kernels (it supports: {', '.join(isas) or 'neither'})")
        problem = _checked(isa)
        if problem is None:
            _selected = Backend(isa, "compiled, self-check passed")
            return _selected
        logger.error("sparsellm %s kernels failed their self-check (%s); not using them", isa, problem)
        if name != "auto":
            raise SparseLLMError(f"the {isa} kernels failed their self-check: {problem}")
    _selected = Backend("torch", "no instruction set with working kernels" if isas else "CPU without AVX2")
    return _selected


@functools.cache
def _checked(isa: str) -> str | None:
    return self_check(isa)


def current() -> Backend:
    """The backend in use, chosen on first use (``SPARSELLM_KERNELS`` overrides the choice)."""
    if _selected is None:
        backend = select(os.environ.get("SPARSELLM_KERNELS", "auto"))
        logger.info("sparsellm kernels: %s (%s)", backend.name, backend.reason)
    return _selected


@contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Run the kernels with a given backend inside the block (e.g. force AVX2 on an AVX-512 CPU)."""
    global _selected
    previous = _selected
    try:
        yield select(name)
    finally:
        _selected = previous


# The operation the layers call, on whichever backend is current.

DENSE_BLOCK_ROWS = 512  # decoded rows per GEMM call on the dense path, at least (measured: csrc dense())


def _handle(layout: Layout):
    """The compiled kernels' view of a layout, made once (layouts do not change)."""
    handle = layout.__dict__.get("_handle")
    if handle is None:
        handle = extension().handle(layout.out_features, layout.in_features, *layout.kernel_args())
        layout.__dict__["_handle"] = handle
    return handle


def _compiled_linear(isa: str, layout: Layout, x: torch.Tensor, threshold: float | None, sparse: bool,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return extension().linear(x, _handle(layout), ISA_CODES[isa], -1.0 if threshold is None else threshold,
                              sparse, bias, DENSE_BLOCK_ROWS)


def linear(layout: Layout, x: torch.Tensor, threshold: float | None = None, sparse: bool = True,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = s(x) W^T + bias, in x's dtype, where s zeroes inputs with |x| <= threshold.

    ``sparse`` runs the sparse kernel (an input-major layout reads only the rows of surviving
    inputs); otherwise the dense path multiplies blocks of decoded rows with the BLAS GEMM, the
    faster way for many tokens.
    """
    backend = current()
    if backend.name == "torch":
        return reference.linear(layout, x, threshold, bias)
    return _compiled_linear(backend.name, layout, x, threshold, sparse, bias)
