#!/usr/bin/env bash
# Run the AVX-512 kernels on a CPU without AVX-512, for correctness only (never for speed): a copy of
# the kernels' sources is compiled against SIMDe (apt: libsimde-dev) plus scalar stand-ins for the
# intrinsics SIMDe 0.7 lacks (missing_intrinsics.h), the CPU check is told AVX-512 is there, and
# pytest runs with that build as sparsellm's compiled kernels. The MoE tile's AVX-512 template
# (GCC vector types) is built for AVX2 and chosen as on an AVX-512 CPU.
#   bash scripts/avx512_emulation/run.sh tests/test_kernels.py tests/test_moe_layer.py
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
[ -f /usr/include/simde/x86/avx512.h ] || { echo "needs SIMDe: apt-get install libsimde-dev" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$root/src/sparsellm/kernels/csrc" "$work/csrc"
cd "$work/csrc"
sed -i "s|#include <immintrin.h>|#include \"$here/missing_intrinsics.h\"|; /#pragma GCC target/d; /#pragma clang attribute push/d" avx512.cpp
sed -i 's|  asm("" : "+v"(v));|  // emulated: no register constraint for SIMDe types|' avx512.cpp
sed -i 's|return avx2 \&\& __builtin_cpu_supports("avx512f") \&\&|return avx2; (void)(|; s|__builtin_cpu_supports("avx512vbmi2");|__builtin_cpu_supports("avx512vbmi2"));|' bindings.cpp
sed -i 's|__attribute__((target("avx512f"))) void panel_products_avx512|__attribute__((target("avx2,fma"))) void panel_products_avx512|; s|allow_avx512 \&\& __builtin_cpu_supports("avx512f")|allow_avx512|' moe.cpp
for file in avx512.cpp bindings.cpp moe.cpp; do  # every edit took
  cmp -s "$file" "$root/src/sparsellm/kernels/csrc/$file" && { echo "emulation: could not patch $file" >&2; exit 1; }
done
cd "$root"
SPARSELLM_EMULATED_CSRC="$work/csrc" SPARSELLM_CACHE="$work/cache" PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" \
  python -m pytest -q -p emulated_kernels "$@"
