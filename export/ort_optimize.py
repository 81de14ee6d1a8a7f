"""The ort-cpu graph: INT8 as onnxruntime's dynamic quantization of the exported fp32 graph
(the MatMuls with a constant weight: quantize_dynamic's MatMulConstBOnly default leaves the
attention matmuls q@k^T and attn@v in fp32, 19% of deit_tiny's time at batch 1 by
scripts/int8_profile.py), and, opt-in, onnxruntime's
transformer optimizer on the fp32 graph. Chosen by measurement on 2 CPU cores (README,
"Quantization and deployment export"): the dynamic form was the fastest INT8 at batch 32 and
agreed best with fp32 on real images (its activation scales come from each batch; scales
calibrated on a few batches clip real images more). MatMulInteger fuses into
DynamicQuantizeMatMul in the session; on a fused graph (ort_attention.py) ``Attention``
becomes ``QAttention``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

__all__ = ["transformer_optimize", "quantize_dynamic_int8", "INT8_OP_TYPES"]

INT8_OP_TYPES = ["MatMul", "Attention"]  # Conv (patch embedding) and the Gemm head stay fp32: one op each


def transformer_optimize(src: str | Path, dst: str | Path) -> dict[str, int]:
    """onnxruntime's ViT fusions (SkipLayerNormalization, Gelu/BiasGelu, Attention where the
    pattern matches) written to ``dst``; returns the fused-op counts. opt_level 0: only the
    portable Python fusions; the hardware-specific ones run when a session loads the file."""
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads/hidden_size 0: detected from the graph (effvision's export fuses attention itself)
    optimized = optimize_model(str(src), model_type="vit", num_heads=0, hidden_size=0, opt_level=0)
    optimized.save_model_to_file(str(dst))
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


def quantize_dynamic_int8(src: str | Path, dst: str | Path, per_channel: bool = False,
                          op_types: list[str] | None = INT8_OP_TYPES) -> dict[str, Any]:
    """int8 weights, per-batch uint8 activations for the weight MatMuls and Attention of ``src``
    (``op_types=None``: every op type onnxruntime's quantize_dynamic takes, its own default)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    del model.graph.value_info[:]  # the dynamo graph's value_info trips the quantizer's shape inference
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.onnx"
        onnx.save(model, str(plain))
        quantize_dynamic(str(plain), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=op_types,
                         # shape inference stops at contrib ops (Attention, Gelu): their outputs are float
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    return {"form": "ort-dynamic", "weights": "int8 per channel" if per_channel else "int8 per tensor",
            "activations": "uint8, scale per batch", "QAttention": ops.count("QAttention"),
            "MatMulInteger": ops.count("MatMulInteger")}
