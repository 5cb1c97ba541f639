#!/usr/bin/env bash
# Set everything up, then run the main job on the built-in sample model and corpus:
# prune SmolLM2-135M-Instruct with SparseGPT to 50 % sparsity into a compact folder, and report quality
# (perplexity before/after), size (bytes on disk vs dense) and speed (decode on sparse kernels vs dense).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out/sample-sparsegpt-50}
sparsellm prune --model sample --method sparsegpt --sparsity 0.5 --calib builtin --nsamples 64 --seqlen 512 \
    --output "$OUT" --overwrite --eval
sparsellm info "$OUT"                                 # size: bytes on disk per layer vs dense
sparsellm bench "$OUT" --tokens 64 --prefill 256 --repeats 3   # speed: decode / prefill vs dense torch
