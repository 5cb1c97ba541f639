#!/usr/bin/env bash
# The test suite, as CI runs it: set up .venv if needed, lint, then pytest (unit + sample-model tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks
python -m pytest -q "$@"
