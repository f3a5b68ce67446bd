#!/usr/bin/env bash
# Create .venv and install nanochat with its dev tools. Offline-safe where a local torch wheel is provided.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
# torch first, exactly pinned: PyPI's default build (CUDA on Linux GPUs), or a local CPU wheel when pip is
# pointed at one (find-links); then the rest, which sees torch already satisfied.
.venv/bin/pip install --disable-pip-version-check -q "torch==2.13.0"
.venv/bin/pip install --disable-pip-version-check -q -e ".[dev]"
.venv/bin/python -c "import torch, nanochat; print(f'nanochat ready: torch {torch.__version__}, cuda {torch.cuda.is_available()}')"
