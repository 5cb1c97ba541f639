"""Sparse CPU kernels and the layers that run on them.

``SparseLinear`` (linear.py) runs a weight held in a kernel layout (layouts.py): dense, bitmask or
2:4, with float or 4/8-bit integer values, row-major or input-major for activation sparsity.
``use_kernels`` / ``load`` (model.py) put a whole pruned model on them. The compiled kernels
(csrc/, AVX-512 or AVX2) or the PyTorch fallback are chosen in backend.py. ``growing_cache``
(cache.py) is a KV cache for decoding that grows in place instead of being copied at every token.
Around the linear layers, norm.py, attention.py and decoder.py run the rest of a decoded token in
compiled or direct calls where that computes the same values.
"""

from .backend import Backend, current, use_backend
from .cache import GrowingLayer, cache_argument, growing_cache
from .layouts import Layout, Quantization, build
from .linear import SparseLinear
from .model import KernelReport, load, use_kernels

__all__ = ["Backend", "GrowingLayer", "KernelReport", "Layout", "Quantization", "SparseLinear", "build", "cache_argument",
           "current", "growing_cache", "load", "use_backend", "use_kernels"]
