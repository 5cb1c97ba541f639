#!/usr/bin/env bash
# A separate virtual environment with llm-compressor (the best open tool for one-shot pruning),
# next to the same CPU torch 2.13.0, so benchmarks/peers/run_llmcompressor.py can run the same job.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv-llmcompressor
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "llmcompressor==${LLMCOMPRESSOR_VERSION:-0.14.0.1}" 2>&1 \
    | grep -v "is ignored" || true
"$VENV/bin/python" -c "import llmcompressor, torch, transformers; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
