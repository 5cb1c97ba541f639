#!/usr/bin/env bash
# The peer of the sliding-window benchmark: local-attention (lucidrains), the common open implementation,
# installed into benchmarks/peers/site (ignored by git) and put on sys.path by benchmarks/bench_attention.py
# only. Its dependencies are small pure-Python packages; torch is the project venv's own (--no-deps), so
# nothing large is downloaded and the shared venv is left untouched. Run it with the project's Python.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --upgrade --target site \
    local-attention==1.11.2 einops==0.8.2 hyper-connections==0.4.11 torch-einops-utils==0.2.0 2>&1 \
    | grep -v "is ignored" || true
"$PYTHON" -c "import sys; sys.path.insert(0, 'site'); import local_attention, torch; print('local-attention', \
local_attention.__file__, 'torch', torch.__version__)"
