#!/usr/bin/env bash
# The main job: the quickstart recipe (digits, a ViT for 32x32, CPU) - train, eval,
# ONNX export with parity check, benchmark torch vs onnxruntime. About 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=runs/quickstart-$(date +%Y%m%d-%H%M%S)
.venv/bin/effvision run recipes/quickstart.yaml --out "$out"
echo
echo "results: $out/*/summary.json; throughput plot: $out/04-bench/bench.png"
# The figures of this run as a ledger entry (bench/results/): docs/getting-started.md shows the newest.
echo "ledger entry: $(.venv/bin/python -m effvision.benchmarks.ledger quickstart "$out")"
