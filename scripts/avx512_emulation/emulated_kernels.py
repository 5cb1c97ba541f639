"""pytest plugin (see run.sh): sparsellm's compiled kernels built from $SPARSELLM_EMULATED_CSRC."""

import functools
import os
from pathlib import Path

from torch.utils import cpp_extension

from sparsellm.kernels import backend


@functools.cache
def _emulated():
    csrc = Path(os.environ["SPARSELLM_EMULATED_CSRC"])
    build = csrc.parent / "build"
    build.mkdir(exist_ok=True)
    return cpp_extension.load(
        name="sparsellm_kernels_emulated", sources=[str(csrc / name) for name in backend.SOURCES],
        extra_cflags=["-O1", "-mavx2", "-mfma", "-mf16c", "-mbmi2", "-mpopcnt", "-fopenmp", "-fno-math-errno"],
        extra_ldflags=["-fopenmp"], build_directory=str(build))


backend._compiled = _emulated
backend.build_key = functools.cache(lambda: "emulated")
assert "avx512" in backend.cpu_isas(), "the emulated build does not report AVX-512"
