"""Whether Triton kernels can run for a tensor: CUDA tensor (or TRITON_INTERPRET=1 on the
CPU, for tests) and an importable triton. ``EFFVISION_NO_TRITON=1`` forces the references."""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # CPU-only installs without triton: the references run
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "use_triton"]


def use_triton(t: torch.Tensor) -> bool:
    if not HAVE_TRITON or os.environ.get("EFFVISION_NO_TRITON") == "1":
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
