"""Which implementation runs a block-sparse attention: the effvision Triton kernel, PyTorch's
FlexAttention (its own Triton block-sparse attention, from the same block mask) or SDPA with
the equivalent dense mask (the reference). All three compute the same thing; the policy layer
does not depend on which runs.

``backend: auto`` picks per shape from ``CUDA_RULES`` (first row whose max N covers the
sequence); off CUDA the reference runs. The rules are the issue's expectation, not a
measurement: no GPU was lent when they were written (gpu_bench section ``sparse_attention``
measures all three side by side; change the table from its numbers)."""
from __future__ import annotations

import warnings
from typing import Any, Literal

import torch

from ..kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_ref, check_block_mask

__all__ = ["Backend", "BACKENDS", "CUDA_RULES", "pick_backend", "flex_block_mask", "flex_attend", "attend"]

Backend = Literal["auto", "kernel", "flex", "sdpa"]
BACKENDS = ("auto", "kernel", "flex", "sdpa")
# (largest N, backend) on CUDA, first match wins. At N <= 256 (classifiers, 197 tokens) a 64-token
# block grid has 4 blocks a row: launch overhead, not FLOPs, dominates, so dense-masked SDPA.
CUDA_RULES: list[tuple[int, str]] = [(256, "sdpa"), (1 << 31, "kernel")]
_warned: set[str] = set()


def pick_backend(backend: str, n: int, device: torch.device) -> str:
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "sdpa"
    return next(name for max_n, name in CUDA_RULES if n <= max_n)


def flex_block_mask(block_mask: torch.Tensor, n: int, block: int) -> Any:
    """FlexAttention's BlockMask for an (H, nb, nb) bool block mask over N tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    bm = block_mask

    def mask_mod(b, h, qi, ki):
        return bm[h, qi // block, ki // block]

    return create_block_mask(mask_mod, None, bm.shape[0], n, n, device=str(bm.device), BLOCK_SIZE=block)


_compiled: dict[str, Any] = {}


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scale: float) -> torch.Tensor:
    """flex_attention: compiled on CUDA (its fused Triton kernel); eager elsewhere (PyTorch's
    unfused implementation, forward only on the CPU). Rows with no allowed key give zeros."""
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        fn = _compiled.setdefault("flex", torch.compile(flex_attention, dynamic=False))
        return fn(q, k, v, block_mask=mask, scale=scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("FlexAttention has no backward on the CPU")
    with warnings.catch_warnings():  # "called without torch.compile()": intended off CUDA
        warnings.simplefilter("ignore")
        # it refuses inputs that require grad even under no_grad
        return flex_attention(q.detach(), k.detach(), v.detach(), block_mask=mask, scale=scale)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block: int, scale: float,
           backend: str = "auto", cache: dict[str, Any] | None = None) -> torch.Tensor:
    """(B, H, N, D) block-sparse attention through the chosen backend; ``cache`` keeps
    FlexAttention's BlockMask between calls (one per device and N)."""
    n = q.shape[2]
    check_block_mask(block_mask, q.shape[1], n, block)
    name = pick_backend(backend, n, q.device)
    if name == "flex" and not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        if "flex-cpu-grad" not in _warned:
            _warned.add("flex-cpu-grad")
            warnings.warn("FlexAttention has no backward on the CPU; using the SDPA reference for training there",
                          stacklevel=2)
        name = "sdpa"
    if name == "kernel":
        return block_sparse_attention(q, k, v, block_mask, block=block, scale=scale)
    if name == "flex":
        cache = {} if cache is None else cache
        key = f"{q.device}:{n}"
        if key not in cache:
            cache[key] = flex_block_mask(block_mask.to(q.device), n, block)
        return flex_attend(q, k, v, cache[key], scale)
    return block_sparse_attention_ref(q, k, v, block_mask, block=block, scale=scale)
