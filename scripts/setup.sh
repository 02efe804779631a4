#!/usr/bin/env bash
# Create .venv (if needed) and install binopt with its extras.
# torch is installed first as `torch==2.13.0` (a local CPU wheel on the project's
# machines) only when no torch is importable; an existing torch is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] no torch in .venv: installing torch==2.13.0 (CPU build)"
  "$VPY" -m pip install --quiet "torch==2.13.0"
fi
# Skip the editable install when it is already current (fast repeated runs).
stamp=.venv/.binopt-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VPY" -m pip install --quiet -e ".[dev,data,tune]"
  touch "$stamp"
fi
"$VPY" -c "import torch, binopt; print(f'[setup] binopt {binopt.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
