"""Fused Adam moment update for GaLore, fp32 and block-wise 8-bit states.

Scope: one elementwise pass over a (low-rank or dense) gradient and its two moments.
  - ``adam_direction``: updates the moments in place and returns N = m / (sqrt(v) + eps),
    the normalised direction GaLore projects back (the back-projection itself, weight update
    and decoupled weight decay are one cuBLAS GEMM with an epilogue:
    ``p.addmm_(N, P, beta=1 - lr*wd, alpha=-step*scale*(1 - lr*wd))``, so it needs no kernel).
  - ``adam_dense``: same, but writes p <- (p - step_size * N) * decay into the weight
    instead of returning N (the parameters GaLore leaves dense).
  - ``*8bit``: the moments live as int8/uint8 codes with one fp32 absmax per block of
    ``QBLOCK`` elements (kernels.quant8); each program dequantizes one block, updates it,
    requantizes it with the new absmax and writes the codes back: the fp32 moments never
    exist in memory.
The formula is galore-torch 1.0's (eps added to sqrt(v) before bias correction, which the
caller folds into step_size). Limits: contiguous tensors; moments fp32 (or 8-bit); the
gradient and weight may be fp32/bf16/fp16 (computed in fp32).
"""
from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, use_triton
from .quant8 import QBLOCK, dequantize_m_ref, dequantize_v_ref, quantize_m_ref, quantize_v_ref

__all__ = ["adam_direction", "adam_dense", "adam_direction_ref", "adam_dense_ref",
           "adam_direction_8bit", "adam_dense_8bit", "adam_direction_8bit_ref", "adam_dense_8bit_ref"]

BLOCK = 1024  # elements per program, fp32 path


# ---- references -----------------------------------------------------------------------------
def adam_direction_ref(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                       beta1: float, beta2: float, eps: float) -> torch.Tensor:
    g = grad.float()
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    return exp_avg / (exp_avg_sq.sqrt() + eps)


def adam_dense_ref(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   beta1: float, beta2: float, eps: float, step_size: float, decay: float) -> None:
    n = adam_direction_ref(grad, exp_avg, exp_avg_sq, beta1, beta2, eps)
    param.add_(n.to(param.dtype), alpha=-step_size)
    if decay != 1.0:
        param.mul_(decay)


def adam_direction_8bit_ref(grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor, v_codes: torch.Tensor,
                            v_absmax: torch.Tensor, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    m = dequantize_m_ref(m_codes, m_absmax).view(grad.shape)
    v = dequantize_v_ref(v_codes, v_absmax).view(grad.shape)
    n = adam_direction_ref(grad, m, v, beta1, beta2, eps)
    codes, absmax = quantize_m_ref(m)
    m_codes.copy_(codes.view_as(m_codes))
    m_absmax.copy_(absmax)
    codes, absmax = quantize_v_ref(v)
    v_codes.copy_(codes.view_as(v_codes))
    v_absmax.copy_(absmax)
    return n


def adam_dense_8bit_ref(param: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                        v_codes: torch.Tensor, v_absmax: torch.Tensor, beta1: float, beta2: float, eps: float,
                        step_size: float, decay: float) -> None:
    n = adam_direction_8bit_ref(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps)
    param.add_(n.to(param.dtype), alpha=-step_size)
    if decay != 1.0:
        param.mul_(decay)


# ---- Triton ---------------------------------------------------------------------------------
if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _adam_kernel(g_ptr, m_ptr, v_ptr, out_ptr, n_elements, beta1, beta2, eps, step_size, decay,
                     WRITE_PARAM: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        n = m / (tl.sqrt_rn(v) + eps)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if WRITE_PARAM:  # out_ptr is the weight
            p = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = (p - step_size * n) * decay
            tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + offs, n, mask=mask)

    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _adam8_kernel(g_ptr, mq_ptr, ma_ptr, vq_ptr, va_ptr, out_ptr, n_elements, beta1, beta2, eps, step_size,
                      decay, WRITE_PARAM: tl.constexpr, QBLOCK: tl.constexpr):
        pid = tl.program_id(0)  # one program per quantization block
        offs = pid * QBLOCK + tl.arange(0, QBLOCK)
        mask = offs < n_elements
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # dequantize: m = absmax * s|s| with s = code/127; v = absmax * (code/255)^4 (kernels.quant8)
        s = tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.float32) / 127.0
        m = tl.load(ma_ptr + pid) * s * tl.abs(s)
        t = tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.float32) / 255.0
        t2 = t * t
        v = tl.load(va_ptr + pid) * t2 * t2
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        n = m / (tl.sqrt_rn(v) + eps)
        if WRITE_PARAM:
            p = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = (p - step_size * n) * decay
            tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + offs, n, mask=mask)
        # requantize with the block's new absmax (masked lanes hold 0 and do not raise it);
        # tl.reduce with our own combine function, because tl.max is a library @jit function
        # that the CPU interpreter cannot run when triton was imported without TRITON_INTERPRET
        m_abs = tl.reduce(tl.abs(m), 0, _maximum)
        v_abs = tl.reduce(v, 0, _maximum)
        m_safe = tl.where(m_abs > 0, m_abs, 1.0)
        v_safe = tl.where(v_abs > 0, v_abs, 1.0)
        qm = tl.floor(tl.sqrt_rn(tl.abs(m) / m_safe) * 127.0 + 0.5)
        qm = tl.where(m < 0, -qm, qm)
        qv = tl.floor(tl.sqrt_rn(tl.sqrt_rn(v / v_safe)) * 255.0 + 0.5)
        tl.store(mq_ptr + offs, qm.to(tl.int8), mask=mask)
        tl.store(vq_ptr + offs, qv.to(tl.uint8), mask=mask)
        tl.store(ma_ptr + pid, m_abs)
        tl.store(va_ptr + pid, v_abs)


def _check(*ts: torch.Tensor) -> None:
    if not all(t.is_contiguous() for t in ts):
        raise ValueError("galore_adam kernels need contiguous tensors")


def _launch(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, out: torch.Tensor, beta1: float,
            beta2: float, eps: float, step_size: float, decay: float, write_param: bool) -> None:
    _check(grad, exp_avg, exp_avg_sq, out)
    n = grad.numel()
    _adam_kernel[(triton.cdiv(n, BLOCK),)](grad, exp_avg, exp_avg_sq, out, n, beta1, beta2, eps, step_size, decay,
                                           WRITE_PARAM=write_param, BLOCK=BLOCK)


def _launch8(grad: torch.Tensor, state: tuple[torch.Tensor, ...], out: torch.Tensor, beta1: float, beta2: float,
             eps: float, step_size: float, decay: float, write_param: bool) -> None:
    _check(grad, *state, out)
    n = grad.numel()
    _adam8_kernel[(triton.cdiv(n, QBLOCK),)](grad, *state, out, n, beta1, beta2, eps, step_size, decay,
                                             WRITE_PARAM=write_param, QBLOCK=QBLOCK)


# ---- dispatch: Triton on CUDA, the reference elsewhere --------------------------------------
def adam_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   beta1: float, beta2: float, eps: float) -> torch.Tensor:
    if not use_triton(grad):
        return adam_direction_ref(grad, exp_avg, exp_avg_sq, beta1, beta2, eps)
    out = torch.empty_like(exp_avg)
    _launch(grad, exp_avg, exp_avg_sq, out, beta1, beta2, eps, 0.0, 1.0, False)
    return out


def adam_dense(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               beta1: float, beta2: float, eps: float, step_size: float, decay: float) -> None:
    if not use_triton(grad):
        return adam_dense_ref(param, grad, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size, decay)
    _launch(grad, exp_avg, exp_avg_sq, param, beta1, beta2, eps, step_size, decay, True)


def adam_direction_8bit(grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor, v_codes: torch.Tensor,
                        v_absmax: torch.Tensor, beta1: float, beta2: float, eps: float) -> torch.Tensor:
    if not use_triton(grad):
        return adam_direction_8bit_ref(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps)
    out = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    _launch8(grad, (m_codes, m_absmax, v_codes, v_absmax), out, beta1, beta2, eps, 0.0, 1.0, False)
    return out


def adam_dense_8bit(param: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                    v_codes: torch.Tensor, v_absmax: torch.Tensor, beta1: float, beta2: float, eps: float,
                    step_size: float, decay: float) -> None:
    if not use_triton(grad):
        return adam_dense_8bit_ref(param, grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps,
                                   step_size, decay)
    _launch8(grad, (m_codes, m_absmax, v_codes, v_absmax), param, beta1, beta2, eps, step_size, decay, True)
