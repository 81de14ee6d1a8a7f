#!/usr/bin/env bash
# CIFAR-10 compression benchmark on this machine's CPU (dense, INT8, pruned, pruned + distilled,
# pruned + distilled + INT8; onnxruntime accuracy and img/s): about 30 minutes on 2 cores.
#   scripts/cpu_bench.sh [--out runs/cpu_bench] [--dense-budget 600] [--finetune-budget 180] ...
# Arguments go to scripts/cpu_bench.py (--help lists them). The table is also filed in the results
# ledger as section cpu-bench (bench/results/; --ledger-dir DIR, --no-ledger).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "cpu_bench: $PY not found; run scripts/setup.sh first (or set PYTHON)" >&2; exit 2; }
exec "$PY" scripts/cpu_bench.py "$@"
