"""Dense vs contextual-sparse forward of one model, timed side by side: the two alternate call
by call in one process (the same load on both), medians."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .contextual import set_contextual_mode_

__all__ = ["dense_vs_sparse"]


@torch.no_grad()
def dense_vs_sparse(model: nn.Module, x: torch.Tensor, iters: int = 30, warmup: int = 3,
                    sync: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Median ms of the dense and the sparse forward on the batch ``x``, alternating call by call."""
    model.eval()
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    try:
        for i in range(warmup + iters):
            for mode in ("dense", "sparse"):
                set_contextual_mode_(model, mode)
                sync()
                t = time.perf_counter()
                model(x)
                sync()
                if i >= warmup:
                    times[mode].append(time.perf_counter() - t)
    finally:
        set_contextual_mode_(model, "sparse")
    d, s = (statistics.median(times[m]) * 1e3 for m in ("dense", "sparse"))
    return {"batch_size": len(x), "iters": iters, "dense_ms_p50": d, "sparse_ms_p50": s, "speedup": d / s}
