"""The GPU benchmark harness: the runner behind scripts/gpu_bench.sh (``runner``), the sections
registry and what a section may use (``registry``), the sections of no technique
(``core_sections``) and the results ledger (``ledger``). Techniques register their own sections
from their ``plugin.py``; nothing of the core library imports this package but those."""
