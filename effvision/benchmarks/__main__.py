"""``python -m effvision.benchmarks``: the gpu_bench runner (scripts/gpu_bench.sh calls it)."""
import sys

from .runner import main

sys.exit(main())
