"""Will TensorRT accept this ONNX graph? Checked without TensorRT: every node's op against
TensorRT's supported-op list (data/tensorrt_ops.json, copied from onnx-tensorrt's
docs/operators.md; its source is inside the file) and TensorRT's QDQ rules: signed int8 (or
fp8) with zero point 0, per-tensor activation scales, weight scales per output channel."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from effvision.errors import EffVisionError

__all__ = ["Violation", "check_tensorrt", "TensorRTCompatError", "supported_ops", "op_list_used", "TRT_OPSETS",
           "check_qdq_rules", "raise_if_incompatible"]
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_OK_QTYPES = {onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN}


class TensorRTCompatError(EffVisionError):
    """The graph has nodes TensorRT would reject."""


@dataclass
class Violation:
    node: str
    op: str
    problem: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.problem}"


@cache
def supported_ops() -> dict[str, Any]:
    """The op list (regenerate with scripts/tensorrt_ops_from_md.py from onnx-tensorrt's operators.md)."""
    return json.loads((Path(__file__).parent / "data" / "tensorrt_ops.json").read_text())


# opset ranges by deployment target: TensorRT 8.5 (JetPack 5) reads up to opset 17; current TensorRT
# what its op list says.
TRT_OPSETS = {"jetpack5": (9, 17), "tensorrt10": (supported_ops()["opset_min"], supported_ops()["opset_max"])}


def op_list_used(platform: str = "tensorrt10") -> dict[str, Any]:
    """Which list a check used, for manifests: TensorRT version, opset range, source."""
    data = supported_ops()
    return {"method": f"offline list {data['tensorrt']}", "platform": platform, "op_list_tensorrt": data["tensorrt"], "opsets": list(TRT_OPSETS[platform]),
            "op_list_source": data["source"]}


def check_tensorrt(model: onnx.ModelProto | str | Path, platform: str = "tensorrt10") -> list[Violation]:
    """All violations in the graph (an empty list: TensorRT should parse and fuse it)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    ops = supported_ops()["ops"]
    lo, hi = TRT_OPSETS[platform]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    out: list[Violation] = []
    if opset is not None and not lo <= opset <= hi:
        out.append(Violation("<graph>", "opset", f"opset {opset} is outside {lo}..{hi} for {platform}"))
    for n in model.graph.node:
        name = n.name or f"<unnamed {n.op_type}>"
        if n.domain not in ("", "ai.onnx"):
            out.append(Violation(name, n.op_type, f"custom domain '{n.domain}' is not a TensorRT op"))
            continue
        entry = ops.get(n.op_type)
        if entry is None or not entry["supported"]:
            out.append(Violation(name, n.op_type, "not on TensorRT's supported-op list"))
    return out + check_qdq_rules(model)


def check_qdq_rules(model: onnx.ModelProto) -> list[Violation]:
    """TensorRT's QDQ rules alone (also run beside TensorRT's own parser, which accepts some
    Q/DQ forms that TensorRT then cannot fuse into INT8 kernels)."""
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # weights: initializers, and Q(initializer) outputs (the exporter's Q->DQ on constant weights)
    weights = set(inits) | {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits}
    out: list[Violation] = []
    for n in model.graph.node:
        if n.op_type in _QDQ and n.domain in ("", "ai.onnx"):
            out.extend(_check_qdq(n, n.name or f"<unnamed {n.op_type}>", inits, weights, consumers))
    return out


def _check_qdq(n: onnx.NodeProto, name: str, inits: dict[str, onnx.TensorProto], weights: set[str],
               consumers: dict[str, list[onnx.NodeProto]]) -> list[Violation]:
    out = []
    if len(n.input) < 3 or n.input[2] not in inits:
        return [Violation(name, n.op_type, "zero point missing or not a constant (TensorRT needs an explicit 0)")]
    zp = inits[n.input[2]]
    if zp.data_type not in _OK_QTYPES:
        out.append(Violation(name, n.op_type, f"quantized type {onnx.TensorProto.DataType.Name(zp.data_type)}; "
                                              f"TensorRT takes signed INT8 or FP8 E4M3"))
    if np.any(numpy_helper.to_array(zp).astype(np.float32) != 0):
        out.append(Violation(name, n.op_type, "zero point is not 0 (TensorRT quantization is symmetric)"))
    scale = inits.get(n.input[1])
    per_channel = scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1
    axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
    is_weight = n.input[0] in weights
    if per_channel and not is_weight:
        out.append(Violation(name, n.op_type, "per-channel scales on an activation (TensorRT: per tensor)"))
    if per_channel and is_weight:
        users = {c.op_type for c in consumers.get(n.output[0], [])}
        rank = len(inits[n.input[0]].dims) if n.input[0] in inits else 2
        # PyTorch-layout weights (Conv, Gemm transB, Transpose->MatMul) keep output channels on
        # axis 0; a pre-transposed MatMul weight (K, N) keeps them on its last axis
        if axis != 0 and not (users == {"MatMul"} and axis == rank - 1):
            out.append(Violation(name, n.op_type, f"weight scales on axis {axis}, not the output-channel axis"))
    return out


def raise_if_incompatible(violations: list[Violation], what: str) -> None:
    if violations:
        shown = "; ".join(map(str, violations[:5]))
        more = f" (+{len(violations) - 5} more)" if len(violations) > 5 else ""
        raise TensorRTCompatError(f"{what}: TensorRT would reject {len(violations)} node(s): {shown}{more}")
