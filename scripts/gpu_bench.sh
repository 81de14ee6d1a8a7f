#!/usr/bin/env bash
# Every GPU figure from one call, within --budget-s seconds (default 540, this script's data
# and wheel unpacking included): an environment check first (one line and exit 2 if something
# is missing), then every section in priority order, each with its share of the time left;
# results/<timestamp>/ (or --out DIR) gets <section>.json, ledger.json and gpu_bench.md after
# every section. File the results with: python -m effvision.benchmarks.ledger add DIR/ledger.json
#
# Runs on a machine's own python3 (torch, timm, onnxruntime installed) with this checkout on
# PYTHONPATH; nothing is installed. Data: one packed archive of CIFAR-10's ImageFolder,
#   tar czf .data/cifar10.tgz -C ../shared/datasets cifar10      (about 20 MB)
# Extra arguments go to python -m effvision.benchmarks (e.g. --sections inference).
set -euo pipefail
export GPU_BENCH_T0=${GPU_BENCH_T0:-$(date +%s.%N)}  # the budget counts from here
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Packages that machine's python3 lacks (torch-pruning, pycocotools) travel as wheels in
# .data/wheels (pip download them here; see README "GPU benchmark"); a wheel is a zip, so it
# is unpacked to .data/pylib and put on PYTHONPATH: nothing is installed there.
PYLIB=""
if compgen -G ".data/wheels/*.whl" > /dev/null; then
  mkdir -p .data/pylib
  for w in .data/wheels/*.whl; do "$PY" -m zipfile -e "$w" .data/pylib; done
  PYLIB="$PWD/.data/pylib"
fi
export PYTHONPATH="$PWD${PYLIB:+:$PYLIB}${PYTHONPATH:+:$PYTHONPATH}"
DATA=${CIFAR10_ARCHIVE:-.data/cifar10.tgz}
if [ ! -e "$DATA" ] && [ -d ../shared/datasets/cifar10 ]; then
  mkdir -p "$(dirname "$DATA")" && tar czf "$DATA" -C ../shared/datasets cifar10
fi
# Detection section: coco128 packed the same way (tar czf .data/coco128.tgz -C ../shared/datasets coco128).
if [ ! -e .data/coco128.tgz ] && [ -d ../shared/datasets/coco128 ]; then
  mkdir -p .data && tar czf .data/coco128.tgz -C ../shared/datasets coco128
fi
exec "$PY" -m effvision.benchmarks --data "$DATA" "$@"
