#!/usr/bin/env bash
# Creates .venv (idempotent) and installs effvision with the tested versions.
# torch 2.14.1 / torchvision 0.29.1 come first (a local wheel store where the machine has one,
# else the package index); everything else is pinned by constraints.txt, the versions the
# tests passed with. pyproject.toml states the compatible ranges for users.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.effvision-setup
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import effvision" 2>/dev/null; then
  exit 0
fi
echo "setup: creating $VENV and installing effvision (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${PIP[@]}" -c constraints.txt -e ".[dev]"
# Test-only reference for effvision.optim (GaLore): its declared deps (transformers,
# bitsandbytes) are not needed by the adamw module the tests load, so --no-deps.
"${PIP[@]}" --no-deps -c constraints.txt "galore-torch==1.0"
echo "$want" > "$STAMP"
echo "setup: done ($("$VENV/bin/python" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'))" >&2
