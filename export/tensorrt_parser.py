"""The TensorRT check of an ONNX graph, by TensorRT's own ONNX parser where the ``tensorrt``
package imports (and a GPU is visible: its Builder needs CUDA), else by the offline op list
(tensorrt_check.py). effvision's QDQ rules run in both cases: the parser accepts some Q/DQ
forms that TensorRT then cannot fuse into INT8 kernels.

``method``: ``auto`` (the parser when it can run, else the offline list, saying why),
``parser`` (an error where TensorRT cannot run) or ``offline``. The returned record goes into
the export manifest as ``tensorrt_check``, so a deployment knows which check passed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from effvision.errors import EffVisionError

from .tensorrt_check import Violation, check_qdq_rules, check_tensorrt, op_list_used

__all__ = ["CHECK_METHODS", "run_tensorrt_check", "require_tensorrt", "parser_violations", "TensorRTMissing"]

CHECK_METHODS = ("auto", "parser", "offline")
_MISSING = ("the tensorrt Python package is not importable here (pip install tensorrt on a machine with an NVIDIA "
            "GPU and driver)")


class TensorRTMissing(EffVisionError):
    """TensorRT (or the CUDA device its builder needs) is not available on this machine."""


def require_tensorrt(what: str) -> Any:
    """The ``tensorrt`` module, or a one-line error naming what needed it."""
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTMissing(f"{what}: {_MISSING}") from e
    return tensorrt


def _builder(trt: Any, what: str) -> tuple[Any, Any]:
    logger = trt.Logger(trt.Logger.ERROR)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # TensorRT raises TypeError/RuntimeError when CUDA has no device
        raise TensorRTMissing(f"{what}: TensorRT {trt.__version__} imports but cannot start (no CUDA GPU?): "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    if builder is None:
        raise TensorRTMissing(f"{what}: TensorRT {trt.__version__} could not create a builder (no CUDA GPU?)")
    return builder, logger


def network_flags(trt: Any) -> int:
    """Strongly typed network (TensorRT 10: a flag; 11: the only mode, the flag may be gone)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def parser_violations(path: str | Path) -> tuple[list[Violation], str]:
    """Parse ``path`` with TensorRT's OnnxParser; every error and every node the parser marks
    unsupported becomes a Violation. Returns (violations, TensorRT version)."""
    trt = require_tensorrt("--trt-check parser")
    builder, logger = _builder(trt, "--trt-check parser")

    def fresh_parser() -> Any:  # each pass on its own network: supports_model_v2 may fill one
        return trt.OnnxParser(builder.create_network(network_flags(trt)), logger)

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names = [n.name or f"<unnamed {n.op_type}>" for n in model.graph.node]
    ops = [n.op_type for n in model.graph.node]
    out: list[Violation] = []
    # supports_model_v2 (TensorRT >= 10.1) lists every unsupported subgraph, where parse stops at the first error
    parser = fresh_parser()
    if hasattr(parser, "supports_model_v2"):
        parser.supports_model_v2(path.read_bytes(), str(path))
        for i in range(parser.num_subgraphs):
            if not parser.is_subgraph_supported(i):
                for idx in parser.get_subgraph_nodes(i):
                    out.append(Violation(names[idx], ops[idx], "TensorRT's parser does not support this node"))
        parser = fresh_parser()
    ok = parser.parse_from_file(str(path), int(trt.Logger.ERROR))
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = err.node()
        name = err.node_name() if hasattr(err, "node_name") and err.node_name() else (
            names[node] if 0 <= node < len(names) else "<graph>")
        op = err.node_operator() if hasattr(err, "node_operator") and err.node_operator() else (
            ops[node] if 0 <= node < len(ops) else "parse")
        violation = Violation(name, op, f"TensorRT parser: {err.desc()}")
        if all(v.node != violation.node for v in out):
            out.append(violation)
    if not ok and not out:
        out.append(Violation("<graph>", "parse", "TensorRT's parser rejected the graph without naming a node"))
    return out, trt.__version__


def run_tensorrt_check(path: str | Path, platform: str, method: str = "auto") -> tuple[list[Violation], dict[str, Any]]:
    """(violations, the record for the manifest)."""
    if method not in CHECK_METHODS:
        raise EffVisionError(f"unknown TensorRT check '{method}' (available: {', '.join(CHECK_METHODS)})")
    model = onnx.load(str(path), load_external_data=False)
    reason = None
    if method == "parser" or (method == "auto" and platform != "jetpack5"):
        try:
            found, version = parser_violations(path)
            return found + check_qdq_rules(model), {"method": "parser", "tensorrt": version, "platform": platform,
                                                    "qdq_rules": "effvision (tensorrt_check.py)"}
        except TensorRTMissing as e:
            if method == "parser":
                raise
            reason = str(e).split(": ", 1)[1]
    else:  # auto for jetpack5: the local TensorRT is not the device's 8.5
        reason = "target jetpack5 runs TensorRT 8.5; a local parser would check another version"
    record = op_list_used(platform)
    if reason:
        record["parser_not_used"] = reason
    return check_tensorrt(model, platform), record
