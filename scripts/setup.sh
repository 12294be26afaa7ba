#!/usr/bin/env bash
# Create .venv if missing and install maskmill with its pinned dependency ranges (idempotent).
# CPU by default (torch==2.13.0). GPU: install the CUDA build of torch into .venv first, then run
# with MASKMILL_TORCH=torch so pip keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # One pip call: installing torch separately let pip swap in a multi-GB CUDA build.
  pip install --quiet "${MASKMILL_TORCH:-torch==2.13.0}" -e ".[dev]"
  # clip-anytorch declares torchvision, which breaks beside this torch: install it without deps.
  pip install --quiet --no-deps "clip-anytorch==2.6.0"
  touch "$stamp"
fi
