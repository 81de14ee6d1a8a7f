"""Block-wise 8-bit storage for Adam's moments (the references; the Triton path is fused
into kernels.galore_adam's 8-bit update, which dequantizes, updates and requantizes a
block in registers).

Each block of ``QBLOCK`` consecutive elements keeps one fp32 absmax. Codes are companded
rather than linear, so small values in a block with one large value keep precision, and a
non-zero second moment does not round to 0 (which would turn m / (sqrt(v) + eps) into
m / eps):
  first moment  (signed):   code = round(127 * sign(x) * sqrt(|x| / absmax)),  int8
  second moment (>= 0):     code = round(255 * (x / absmax) ** (1/4)),          uint8
bitsandbytes uses a dynamic tree code for the same reason; this power law is simpler and
cheap in a kernel. Memory: 1 byte per element + 4 bytes per block (about 1.02 B/element).
"""
from __future__ import annotations

import torch

__all__ = ["QBLOCK", "quantize_m_ref", "dequantize_m_ref", "quantize_v_ref", "dequantize_v_ref", "num_blocks"]

QBLOCK = 256  # elements per absmax


def num_blocks(numel: int) -> int:
    return -(-numel // QBLOCK)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x flattened and zero-padded to (num_blocks, QBLOCK)."""
    flat = x.detach().float().reshape(-1)
    pad = num_blocks(flat.numel()) * QBLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, QBLOCK)


def quantize_m_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed moment -> (int8 codes shaped like x, fp32 absmax per block)."""
    b = _blocks(x)                                   # (nb, QBLOCK)
    absmax = b.abs().amax(dim=1)                     # (nb,)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    q = torch.floor((b.abs() / safe[:, None]).sqrt() * 127.0 + 0.5)
    q = torch.where(b < 0, -q, q)
    return q.to(torch.int8).reshape(-1)[: x.numel()].view(x.shape), absmax


def dequantize_m_ref(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    s = _blocks(codes) / 127.0
    return (absmax[:, None] * s * s.abs()).reshape(-1)[: codes.numel()].view(codes.shape)


def quantize_v_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative moment -> (uint8 codes shaped like x, fp32 absmax per block)."""
    b = _blocks(x)
    absmax = b.amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    q = torch.floor((b / safe[:, None]).sqrt().sqrt() * 255.0 + 0.5)
    return q.to(torch.uint8).reshape(-1)[: x.numel()].view(x.shape), absmax


def dequantize_v_ref(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    t2 = (_blocks(codes) / 255.0) ** 2
    return (absmax[:, None] * t2 * t2).reshape(-1)[: codes.numel()].view(codes.shape)
