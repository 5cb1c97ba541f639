#!/usr/bin/env bash
# Install the benchmark-only peer local-attention into benchmarks/peers/site (ignored by git), apart from the
# project's venv: local-attention (lucidrains), the common open sliding-window attention, with its small
# pure-Python dependencies. It reuses the venv's torch (--no-deps), so nothing large is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps --target peers/site \
    local-attention==1.11.2 einops==0.8.2 hyper-connections==0.4.11 torch-einops-utils==0.2.0
python - <<'PY'
import sys
sys.path.insert(0, "peers/site")
import local_attention
print("local-attention", local_attention.__file__)
PY
