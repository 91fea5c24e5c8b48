#!/usr/bin/env bash
# Create .venv with the CPU build of torch (pinned first, so nothing pulls CUDA wheels) and install dmfnet.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   + test tools (pytest, ruff) and the system packages the tests use
# VENV=DIR puts the environment elsewhere (the runtime-only install test uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q --disable-pip-version-check -e '.[test]'
  if [ -x scripts/install-test-deps.sh ]; then bash scripts/install-test-deps.sh; fi
else
  python -m pip install -q --disable-pip-version-check -e .
fi
echo "dmfnet installed in $VENV ($(python -c 'import torch; print("torch", torch.__version__)'))"
