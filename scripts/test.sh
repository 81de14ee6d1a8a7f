#!/usr/bin/env bash
# Runs the test suite (sets itself up first). Extra arguments go to pytest, e.g. -k export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -ra --durations=15 tests "$@"  # the slowest tests, to keep the suite short
