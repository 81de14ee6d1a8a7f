"""``effvision::qdq``: quantize-then-dequantize with ONNX QuantizeLinear semantics (the zero
point's dtype picks int8, uint8 or fp8 E4M3), as a torch custom op with an ONNX translation.

Why a custom op: torch.export has no fake-tensor kernel for aten's fake_quantize ops with
tensor scales, so the dynamo exporter cannot trace them; this op traces, and its translation
emits exactly one QuantizeLinear/DequantizeLinear pair with constant scale and zero point,
the form TensorRT and onnxruntime fuse. Training uses aten's fake_quantize ops instead (they
carry the straight-through gradient); both compute the same values.
"""
from __future__ import annotations

import torch

__all__ = ["qdq", "qdq_reference", "onnx_translations", "FP8_MAX"]

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def qdq_reference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """Plain-PyTorch QuantizeLinear -> DequantizeLinear (round half to even, saturate)."""
    shape = [1] * x.dim()
    if scale.dim() == 1:
        shape[axis] = -1  # per channel: broadcast along axis
    s = scale.float().reshape(shape)
    if zero_point.dtype == torch.float8_e4m3fn:
        q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        return (q * s).to(x.dtype)
    info = torch.iinfo(zero_point.dtype)
    zp = zero_point.float().reshape(shape)
    q = (torch.round(x.float() / s) + zp).clamp(info.min, info.max)
    return ((q - zp) * s).to(x.dtype)


@torch.library.custom_op("effvision::qdq", mutates_args=())
def qdq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    return qdq_reference(x, scale, zero_point, axis)


@qdq.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty_like(x)


def _qdq_onnx(x, scale, zero_point, axis: int):
    from onnxscript import opset19 as op  # opset 19 QDQ also takes fp8; the exporter's opset is >= 17

    q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _qdq_onnx_opset13(x, scale, zero_point, axis: int):
    from onnxscript import opset13 as op

    q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def onnx_translations(opset: int) -> dict:
    return {torch.ops.effvision.qdq.default: _qdq_onnx if opset >= 19 else _qdq_onnx_opset13}


