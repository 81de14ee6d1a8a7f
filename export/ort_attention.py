"""timm self-attention as one onnxruntime ``com.microsoft.Attention`` node, for the ort-cpu target.

Why: the dynamo exporter writes timm's attention as qkv Linear -> Reshape -> Transpose -> 3x
Slice/Squeeze (unbind) -> its SDPA decomposition (K reshaped to 3-D, transposed and reshaped
back, sqrt(scale) multiplied into q and k separately) -> MatMul/Softmax/MatMul -> Transpose.
onnxruntime's transformer optimizer cannot fuse that (nor the TorchScript exporter's graph:
timm fuses q, k and v into one Linear, the optimizer's pattern wants three), so the attention
core runs as ~15 small ops per block. ``Attention`` takes exactly timm's fused qkv weight and
bias and runs the whole core in one kernel; onnxruntime's dynamic quantizer turns it into
``QAttention`` (int8 qkv projection).

``fused_attention(model)`` swaps eligible timm ``Attention`` modules' forward for one that calls
the ``effvision::ort_attention`` custom op (same math as timm's non-fused path) while exporting;
the ONNX translation emits the contrib op. Not for TensorRT targets (a contrib op).
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["fused_attention", "attention_translations", "eligible"]


@torch.library.custom_op("effvision::ort_attention", mutates_args=())
def ort_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_heads: int) -> torch.Tensor:
    """x (B, N, C_in), weight (3C, C_in), bias (3C,) -> (B, N, C): softmax(q k^T / sqrt(d)) v per head."""
    b, n, _ = x.shape
    qkv = F.linear(x, weight, bias).reshape(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)  # 3, B, H, N, d
    q, k, v = qkv.unbind(0)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # B, H, N, N
    return (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)  # B, N, C


@ort_attention.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0] // 3)


def _attention_onnx(x, weight, bias, num_heads: int):
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    attention = Op(Opset("com.microsoft", 1), "Attention", _attention_schema())
    # Attention wants the weight as (C_in, 3C); a Transpose of an initializer that onnxslim /
    # onnxruntime fold into a constant.
    return attention(x, op.Transpose(weight, perm=[1, 0]), bias, num_heads=num_heads)


def _attention_schema():
    """The subset of onnxruntime's contrib schema that this export uses: onnx does not know the
    contrib ops, and the exporter needs a schema to emit a node."""
    from onnx.defs import OpSchema

    t = [("T", ["tensor(float)"], "float")]
    return OpSchema("Attention", "com.microsoft", 1, type_constraints=t,
                    inputs=[OpSchema.FormalParameter(n, "T") for n in ("input", "weights", "bias")],
                    outputs=[OpSchema.FormalParameter("output", "T")],
                    attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads")])


def attention_translations() -> dict:
    return {torch.ops.effvision.ort_attention.default: _attention_onnx}


def eligible(module: nn.Module) -> bool:
    """A timm Attention whose core is plain scaled-dot-product attention over a fused qkv Linear
    with bias (no q/k norm, no gate, no output norm, the default scale)."""
    from timm.layers import Attention

    if not (isinstance(module, Attention) and isinstance(module.qkv, nn.Linear) and module.qkv.bias is not None):
        return False
    # head size from the weights, not the attribute: a pruned model's qkv may have shrunk
    width, heads = module.qkv.out_features // 3, module.num_heads
    return (module.qkv.out_features % (3 * heads) == 0 and abs(module.scale - (width // heads) ** -0.5) < 1e-6
            # a fake-quant qkv (effvision.compress.quantize) only with its quantizers switched off
            and not any(getattr(q, "enabled", False) for q in module.qkv.children())
            and isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity)
            and isinstance(module.norm, nn.Identity) and getattr(module, "gate", None) is None)


def _forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    if attn_mask is not None or is_causal:
        raise RuntimeError("fused_attention: attention masks are not supported")
    x = ort_attention(x, self.qkv.weight, self.qkv.bias, self.num_heads)
    return self.proj_drop(self.proj(x))


@contextlib.contextmanager
def fused_attention(model: nn.Module) -> Iterator[int]:
    """While active, eligible attention modules run through ``effvision::ort_attention``; yields
    how many were swapped. The model is restored on exit."""
    swapped = [m for m in model.modules() if eligible(m)]
    for m in swapped:
        m.forward = types.MethodType(_forward, m)
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward  # back to the class's forward
