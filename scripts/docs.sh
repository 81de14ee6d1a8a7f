#!/usr/bin/env bash
# Builds the documentation site (mkdocs, strict: a broken link or anchor, a page missing from the
# nav or a reference that does not resolve fails the build) into site/. Extra arguments go to
# mkdocs build; `scripts/docs.sh serve` serves it with live reload instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = serve ]; then
  shift
  exec .venv/bin/mkdocs serve "$@"
fi
export NO_MKDOCS_2_WARNING=1  # material's notice about its successor, on every build
exec .venv/bin/mkdocs build --strict --clean "$@"
