#!/usr/bin/env bash
# Runs the test suite (sets itself up first). Extra arguments go to pytest, e.g. -k export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers (pytest-xdist), one test file each at a time, one torch thread each (tests/conftest.py):
# 15.4 min instead of 25.6 sequentially on this project's 2-core machine (docs/getting-started.md). EFFVISION_TEST_WORKERS=0: sequential.
exec .venv/bin/python -m pytest -q -ra -n "${EFFVISION_TEST_WORKERS:-2}" --dist loadfile --durations=15 tests "$@"
