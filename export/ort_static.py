"""Static INT8 for onnxruntime CPU: onnxruntime's quantize_static of the exported fp32 graph with
activation scales calibrated on the caller's images (unlike quantize_dynamic in ort_optimize.py,
which finds each activation's range per batch at run time, and, by its MatMulConstBOnly default,
leaves the attention matmuls fp32). Defaults are the measured ones on deit_tiny, 2 cores
(scripts/int8_profile.py): QDQ with float outputs, per-tensor weights, uint8 activations.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from effvision.errors import EffVisionError

__all__ = ["MIN_CALIBRATION_IMAGES", "STATIC_OP_TYPES", "quantize_static_int8"]

MIN_CALIBRATION_IMAGES = 8  # fewer images give activation ranges of a handful of samples: clipped real inputs
# the patch-embedding Conv stays fp32: with a float output the session does not fuse its DQ into a
# QLinearConv, so quantizing it only adds a QuantizeLinear/DequantizeLinear pass
STATIC_OP_TYPES = ("MatMul", "Gemm")
_FORMS = ("qdq", "qoperator")
_ACTIVATIONS = ("uint8", "int8")
_METHODS = ("minmax", "percentile")
# op types in the written graph that carry INT8 arithmetic or its (de)quantization
_COUNTED = ("QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "MatMulInteger",
            "DynamicQuantizeLinear", "QGemm", "MatMul", "Gemm", "Conv")


def _input_shape(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """Name and dims (None where symbolic) of the graph's single real input."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise EffVisionError(f"static INT8 needs a graph with one input, found {len(inputs)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _check_calibration(calibration: np.ndarray, dims: list[int | None]) -> np.ndarray:
    data = np.asarray(calibration)
    if data.ndim != len(dims):
        raise EffVisionError(f"calibration has shape {data.shape}; the graph takes {len(dims)}-d input "
                             f"(N, C, H, W)")
    want = dims[1:]
    if any(w is not None and w != got for w, got in zip(want, data.shape[1:])):
        raise EffVisionError(f"calibration images are {tuple(data.shape[1:])}; the graph takes "
                             f"{tuple('?' if w is None else w for w in want)}")
    if len(data) < MIN_CALIBRATION_IMAGES:
        raise EffVisionError(f"calibration has {len(data)} images; static INT8 needs at least "
                             f"{MIN_CALIBRATION_IMAGES}")
    if dims[0] is not None and len(data) % dims[0]:
        raise EffVisionError(f"calibration has {len(data)} images; the graph's fixed batch {dims[0]} must divide it")
    if not np.isfinite(data).all():
        raise EffVisionError("calibration holds NaN or infinite values")
    return data.astype(np.float32, copy=False)


def quantize_static_int8(src: str | Path, dst: str | Path, calibration: np.ndarray, *, per_channel: bool = False,
                         form: str = "qdq", activation: str = "uint8", op_types: Sequence[str] = STATIC_OP_TYPES,
                         float_outputs: bool = True, weight_matmuls_only: bool = False, method: str = "minmax",
                         batch_size: int = 8, extra_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """int8 weights (symmetric, per output channel if ``per_channel``) and ``activation`` (uint8 |
    int8) activations with scales calibrated on ``calibration`` (N, C, H, W float32, normalized as
    the model expects) for the ``op_types`` nodes of ``src``, written to ``dst``. ``form``: qdq
    (QuantizeLinear/DequantizeLinear around float ops; the session fuses them) | qoperator
    (QLinearMatMul, QLinearConv: every output int8). ``float_outputs`` (qdq): only the inputs of
    the ``op_types`` nodes are quantized; the session runs DQ->MatMul as MatMulIntegerToFloat and
    the bias Add, Softmax and GELU see fp32. ``weight_matmuls_only``: the attention matmuls (q@k^T,
    attn@v: no constant input) stay fp32. ``method``: minmax | percentile (99.999th percentile of |x|). ``extra_options``:
    quantize_static's own, over the ones set here."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    for name, value, allowed in (("form", form, _FORMS), ("activation", activation, _ACTIVATIONS),
                                 ("method", method, _METHODS)):
        if value not in allowed:
            raise EffVisionError(f"unknown {name} '{value}' (available: {', '.join(allowed)})")
    model = onnx.load(str(src))
    input_name, dims = _input_shape(model)
    data = _check_calibration(calibration, dims)
    step = dims[0] or batch_size

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(range(0, len(data), step))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._batches, None)
            return None if start is None else {input_name: data[start:start + step]}

    del model.graph.value_info[:]  # the dynamo graph's value_info trips the quantizer's shape inference
    weights = {i.name for i in model.graph.initializer}
    # QDQ mode ignores quantize_static's MatMulConstBOnly: exclude the activation-by-activation matmuls by name
    attention = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.onnx"
        onnx.save(model, str(plain))
        try:
            quantize_static(str(plain), str(dst), _Reader(),
                            quant_format=QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator,
                            op_types_to_quantize=list(op_types), per_channel=per_channel,
                            activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8,
                            calibrate_method=(CalibrationMethod.MinMax if method == "minmax"
                                              else CalibrationMethod.Percentile),
                            nodes_to_exclude=attention if weight_matmuls_only else None,
                            extra_options={
                                # shape inference stops at contrib ops: their outputs are float
                                "DefaultTensorType": onnx.TensorProto.FLOAT,
                                # int8 outputs put Q/DQ before the bias Add, Softmax (QLinearSoftmax) and
                                # inside GELU (no Gelu fusion): measured ~14 dB and slower on deit_tiny
                                "OpTypesToExcludeOutputQuantization":
                                    list(op_types) if float_outputs and form == "qdq" else [],
                                **(extra_options or {})})
        except Exception as e:  # onnxruntime's quantizer raises many types; the caller needs the first line
            raise EffVisionError(f"onnxruntime's static quantization failed: "
                                 f"{str(e).strip().splitlines()[0]}") from e
    ops = Counter(n.op_type for n in onnx.load(str(dst)).graph.node)
    return {"form": f"ort-static-{form}", "weights": f"int8 {'per channel' if per_channel else 'per tensor'}",
            "activations": f"{activation}, calibrated ({method})", "op_types": list(op_types),
            "outputs": "fp32" if float_outputs and form == "qdq" else "int8",
            "attention_matmuls": "fp32" if weight_matmuls_only else "int8",
            "ops": {k: ops[k] for k in _COUNTED if ops[k]}, "calibration_images": len(data)}
