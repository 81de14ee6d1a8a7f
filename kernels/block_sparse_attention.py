"""Block-sparse flash attention (non-causal), forward and backward, beside its reference.

Layout: q, k, v are (B, H, N, D); ``block_mask`` is a bool (H, ceil(N/block), ceil(N/block))
tensor, True where query block i attends to key block j (one mask per head, shared over the
batch). Any N (the tail block is masked per token), D in {32, 64, 128}, fp16/bf16/fp32 inputs
with fp32 accumulation. A query row whose blocks are all masked gets a zero output and zero
gradients (softmax over an empty set is undefined; zeros are what a skipped head contributes).

The kernel walks a compacted list of the active key blocks per query block (and of the
active query blocks per key block for dK/dV), so its cost is proportional to the number of
True blocks, the cost the policies in effvision.attention count. Other head dims fall back
to the reference with a one-time warning.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from ._triton import HAVE_TRITON, use_triton

__all__ = ["block_sparse_attention", "block_sparse_attention_ref", "token_mask", "check_block_mask",
           "SUPPORTED_HEAD_DIMS", "BLOCK"]

BLOCK = 64  # tokens per query/key block (the unit of the mask)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
_warned: set[int] = set()


def check_block_mask(block_mask: torch.Tensor, heads: int, n: int, block: int) -> None:
    """One-line error when the mask does not match (heads, blocks, blocks)."""
    nb = -(-n // block)
    if block_mask.dtype != torch.bool or tuple(block_mask.shape) != (heads, nb, nb):
        raise ValueError(f"block_mask must be bool of shape (heads={heads}, {nb}, {nb}) for N={n} and "
                         f"block={block}; got {block_mask.dtype} {tuple(block_mask.shape)}")


def token_mask(block_mask: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """(H, nb, nb) block mask -> (H, N, N) token mask."""
    m = block_mask.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return m[:, :n, :n]


# ---- reference ------------------------------------------------------------------------------
def block_sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                               block: int = BLOCK, scale: float | None = None) -> torch.Tensor:
    """SDPA with the equivalent boolean mask; rows with no allowed key give zeros."""
    n = q.shape[2]
    tm = token_mask(block_mask.to(q.device), n, block)           # (H, N, N)
    row_any = tm.any(-1, keepdim=True)                           # (H, N, 1)
    # an empty row would make SDPA return NaN (and NaN gradients): give it a dummy full row,
    # then zero its output so nothing flows back through it
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=tm | ~row_any, scale=scale)
    return out.masked_fill(~row_any, 0.0)


# ---- Triton ---------------------------------------------------------------------------------
if HAVE_TRITON:
    import triton
    import triton.language as tl

    # tl.max/tl.sum are library @jit functions the CPU interpreter cannot always run (see
    # galore_adam); reduce with our own combine functions instead
    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cnt_ptr, idx_ptr, n_ctx, heads, nb, scale,
                    BLOCK: tl.constexpr, D: tl.constexpr):
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % heads
        base = bh.to(tl.int64) * n_ctx * D
        rows = qb * BLOCK + tl.arange(0, BLOCK)
        cols_d = tl.arange(0, D)
        row_ok = rows < n_ctx
        q = tl.load(q_ptr + base + rows[:, None] * D + cols_d[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK], -1.0e30, tl.float32)
        l_i = tl.full([BLOCK], 0.0, tl.float32)
        acc = tl.full([BLOCK, D], 0.0, tl.float32)
        lst = (h * nb + qb) * nb
        cnt = tl.load(cnt_ptr + h * nb + qb)
        for i in range(0, cnt):
            kb = tl.load(idx_ptr + lst + i)
            cols = kb * BLOCK + tl.arange(0, BLOCK)
            col_ok = cols < n_ctx
            k = tl.load(k_ptr + base + cols[:, None] * D + cols_d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptr + base + cols[:, None] * D + cols_d[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale                      # (BLOCK, BLOCK)
            s = tl.where(col_ok[None, :], s, -1.0e30)
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _maximum))
            p = tl.exp(s - m_new[:, None])
            p = tl.where(col_ok[None, :], p, 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.reduce(p, 1, _add)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        out = acc / l_safe[:, None]
        # lse = +1e30 for empty rows: exp(s - lse) = 0 in the backward
        lse = tl.where(has, m_i + tl.log(l_safe), 1.0e30)
        tl.store(o_ptr + base + rows[:, None] * D + cols_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(lse_ptr + bh.to(tl.int64) * n_ctx + rows, lse, mask=row_ok)

    @triton.jit
    def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cnt_ptr, idx_ptr, n_ctx, heads,
                       nb, scale, BLOCK: tl.constexpr, D: tl.constexpr):
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % heads
        base = bh.to(tl.int64) * n_ctx * D
        rows = qb * BLOCK + tl.arange(0, BLOCK)
        cols_d = tl.arange(0, D)
        row_ok = rows < n_ctx
        offs = base + rows[:, None] * D + cols_d[None, :]
        q = tl.load(q_ptr + offs, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptr + offs, mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * n_ctx + rows, mask=row_ok, other=1.0e30)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * n_ctx + rows, mask=row_ok, other=0.0)
        dq = tl.full([BLOCK, D], 0.0, tl.float32)
        lst = (h * nb + qb) * nb
        cnt = tl.load(cnt_ptr + h * nb + qb)
        for i in range(0, cnt):
            kb = tl.load(idx_ptr + lst + i)
            cols = kb * BLOCK + tl.arange(0, BLOCK)
            col_ok = cols < n_ctx
            k = tl.load(k_ptr + base + cols[:, None] * D + cols_d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptr + base + cols[:, None] * D + cols_d[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            p = tl.exp(s - lse[:, None])
            p = tl.where(col_ok[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v)).to(tl.float32)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k).to(tl.float32)
        tl.store(dq_ptr + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cnt_ptr, idx_ptr, n_ctx,
                         heads, nb, scale, BLOCK: tl.constexpr, D: tl.constexpr):
        kb = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % heads
        base = bh.to(tl.int64) * n_ctx * D
        cols = kb * BLOCK + tl.arange(0, BLOCK)
        cols_d = tl.arange(0, D)
        col_ok = cols < n_ctx
        offs = base + cols[:, None] * D + cols_d[None, :]
        k = tl.load(k_ptr + offs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=col_ok[:, None], other=0.0)
        dk = tl.full([BLOCK, D], 0.0, tl.float32)
        dv = tl.full([BLOCK, D], 0.0, tl.float32)
        lst = (h * nb + kb) * nb
        cnt = tl.load(cnt_ptr + h * nb + kb)
        for i in range(0, cnt):
            qb = tl.load(idx_ptr + lst + i)
            rows = qb * BLOCK + tl.arange(0, BLOCK)
            row_ok = rows < n_ctx
            q = tl.load(q_ptr + base + rows[:, None] * D + cols_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptr + base + rows[:, None] * D + cols_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_ptr + bh.to(tl.int64) * n_ctx + rows, mask=row_ok, other=1.0e30)
            delta = tl.load(delta_ptr + bh.to(tl.int64) * n_ctx + rows, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale                      # (BLOCK_q, BLOCK_k)
            p = tl.exp(s - lse[:, None])
            p = tl.where(col_ok[None, :] & row_ok[:, None], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do).to(tl.float32)
            dp = tl.dot(do, tl.trans(v)).to(tl.float32)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q).to(tl.float32)
        tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, nb, nb) bool -> counts (H, nb) int32 and indices (H, nb, nb) int32, active first."""
    cnt = mask.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return cnt.contiguous(), idx.contiguous()


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_mask, block, scale):  # noqa: D102
        b, h, n, d = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        nb = block_mask.shape[-1]
        cnt, idx = _compact(block_mask.to(q.device))
        o = torch.empty_like(q)
        lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
        _fwd_kernel[(nb, b * h)](q, k, v, o, lse, cnt, idx, n, h, nb, scale, BLOCK=block, D=d)
        ctx.save_for_backward(q, k, v, o, lse, block_mask)
        ctx.block, ctx.scale = block, scale
        return o

    @staticmethod
    def backward(ctx, do):  # noqa: D102
        q, k, v, o, lse, block_mask = ctx.saved_tensors
        b, h, n, d = q.shape
        nb = block_mask.shape[-1]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()                      # (B, H, N)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        cnt, idx = _compact(block_mask.to(q.device))
        _bwd_dq_kernel[(nb, b * h)](q, k, v, do, lse, delta, dq, cnt, idx, n, h, nb, ctx.scale,
                                    BLOCK=ctx.block, D=d)
        cnt_t, idx_t = _compact(block_mask.to(q.device).transpose(1, 2))
        _bwd_dkdv_kernel[(nb, b * h)](q, k, v, do, lse, delta, dk, dv, cnt_t, idx_t, n, h, nb, ctx.scale,
                                      BLOCK=ctx.block, D=d)
        return dq, dk, dv, None, None, None


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                           block: int = BLOCK, scale: float | None = None) -> torch.Tensor:
    """Attention of (B, H, N, D) q/k/v restricted to the True blocks of ``block_mask``.

    The Triton kernel on CUDA (or TRITON_INTERPRET=1); the reference elsewhere and for head
    dims the kernel does not support (warned once per head dim)."""
    b, h, n, d = q.shape
    check_block_mask(block_mask, h, n, block)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not use_triton(q):
        return block_sparse_attention_ref(q, k, v, block_mask, block, scale)
    if d not in SUPPORTED_HEAD_DIMS or block < 16 or block & (block - 1):
        if d not in _warned:
            _warned.add(d)
            warnings.warn(f"block_sparse_attention: head dim {d} / block {block} not supported by the kernel "
                          f"(head dims {SUPPORTED_HEAD_DIMS}, power-of-two block >= 16); using the reference",
                          stacklevel=2)
        return block_sparse_attention_ref(q, k, v, block_mask, block, scale)
    return _BlockSparseAttention.apply(q, k, v, block_mask, block, scale)
