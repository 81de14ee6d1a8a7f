"""Running a TensorRT engine from Python: build (or load) it, feed it numpy arrays through
torch CUDA tensors (torch is already a dependency, so no pycuda/cuda-python), time it with
CUDA events, and check its outputs against onnxruntime on the same inputs.

Engine parity is judged by the logits' signal-to-noise ratio against onnxruntime, per
precision: TensorRT runs fp32 convolutions and matmuls in TF32 by default and picks its own
kernels (other summation orders), so bit-level agreement with onnxruntime is not expected."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from effvision.errors import EffVisionError

from .onnx import ParityError
from .tensorrt_parser import TensorRTMissing, network_flags, require_tensorrt

__all__ = ["serialize_engine", "TrtEngine", "compare_logits", "graph_precision", "engine_parity", "MIN_SQNR_DB",
           "require_trt_cuda"]

# logit SQNR floor (dB) vs onnxruntime: TF32 (10-bit mantissa) fp32 stays far above 40 dB; fp16
# above 30; INT8/FP8 engines round at other points than onnxruntime's integer kernels (20 dB,
# the same floor as the OpenVINO INT8 check)
MIN_SQNR_DB = {"fp32": 40.0, "fp16": 30.0, "int8": 20.0, "fp8": 20.0}


def require_trt_cuda(what: str) -> Any:
    """``tensorrt``, after checking that torch sees a CUDA GPU; one-line errors otherwise."""
    trt = require_tensorrt(what)
    import torch

    if not torch.cuda.is_available():
        raise TensorRTMissing(f"{what}: TensorRT {trt.__version__} imports but no CUDA GPU is visible")
    return trt


def serialize_engine(onnx_path: Path, input_name: str, shape: tuple[int, ...], profile: tuple[int, int, int],
                     cache_path: Path | None = None) -> bytes:
    """A strongly typed engine (precision from the graph's QDQ/casts) for batch sizes MIN..MAX."""
    trt = require_trt_cuda("TensorRT engine build")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path), int(trt.Logger.WARNING)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EffVisionError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    opt = builder.create_optimization_profile()
    opt.set_shape(input_name, *[(b, *shape) for b in profile])
    config.add_optimization_profile(opt)
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EffVisionError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    if cache_path is not None:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(engine)


class TrtEngine:
    """A deserialized engine with one execution context on the current CUDA device."""

    def __init__(self, engine: bytes | Path) -> None:
        trt = require_trt_cuda("TensorRT engine")
        import torch

        self._trt, self._torch = trt, torch
        data = Path(engine).read_bytes() if isinstance(engine, Path) else engine
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        if self.engine is None:
            raise EffVisionError("TensorRT could not load the engine (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()

    def input_shape(self) -> tuple[int, ...]:
        """The engine's input shape without the batch axis (C, H, W)."""
        return tuple(self.engine.get_tensor_shape(self.inputs[0]))[1:]

    def _bind(self, x: np.ndarray) -> list[Any]:
        torch, trt = self._torch, self._trt
        xt = torch.from_numpy(np.ascontiguousarray(x)).cuda()  # (B, C, H, W) float32
        self.context.set_input_shape(self.inputs[0], tuple(xt.shape))
        self.context.set_tensor_address(self.inputs[0], xt.data_ptr())
        outs = [xt]
        for name in self.outputs:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        return outs  # kept alive while the engine runs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EffVisionError("TensorRT execution failed (see its log above)")

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        bound = self._bind(x)
        self._execute()
        self.stream.synchronize()
        return [t.float().cpu().numpy() for t in bound[1:]]

    def time(self, x: np.ndarray, warmup: int, iters: int) -> list[float]:
        """Seconds per call (input already on the GPU), timed with CUDA events on the engine's stream."""
        torch = self._torch
        bound = self._bind(x)  # noqa: F841 (the buffers must outlive the calls)
        for _ in range(warmup):
            self._execute()
        self.stream.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self._execute()
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times


def graph_precision(onnx_path: Path) -> str:
    """fp8 / int8 (a QDQ graph, by its zero points' type), fp16 (fp16 weights) or fp32: which
    parity floor an engine built from this graph is held to."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name: i.data_type for i in graph.initializer}
    zero_points = {inits.get(n.input[2]) for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    if onnx.TensorProto.FLOAT8E4M3FN in zero_points:
        return "fp8"
    if any(n.op_type == "QuantizeLinear" for n in graph.node):
        return "int8"
    return "fp16" if onnx.TensorProto.FLOAT16 in inits.values() else "fp32"


def compare_logits(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """SQNR (dB), max abs error and top-1 agreement of ``out`` against ``ref`` ((N, K) each)."""
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    noise = float(((out64 - ref64) ** 2).sum())
    sqnr = 10 * np.log10(float((ref64 ** 2).sum()) / noise) if noise > 0 else float("inf")
    return {"sqnr_db": float(sqnr), "max_abs_error": float(np.abs(out64 - ref64).max()),
            "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean())}


def engine_parity(engine: TrtEngine, onnx_path: Path, input_shape: tuple[int, ...], batch_sizes: list[int],
                  precision: str, seed: int = 0) -> dict[str, Any]:
    """Engine vs onnxruntime (CPU) on the same random inputs; raises ParityError below the SQNR floor."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    refs, outs = [], []
    for b in batch_sizes:
        x = rng.standard_normal((b, *input_shape), dtype=np.float32)
        refs.append(session.run(None, {name: x})[0])
        outs.append(engine(x)[0])
    result = {**compare_logits(np.concatenate(refs), np.concatenate(outs)), "batch_sizes": batch_sizes,
              "min_sqnr_db": MIN_SQNR_DB[precision], "reference": f"onnxruntime {ort.__version__} CPU"}
    if not result["sqnr_db"] >= MIN_SQNR_DB[precision]:
        raise ParityError(f"TensorRT engine parity failed: logit SQNR vs onnxruntime {result['sqnr_db']:.1f} dB < "
                          f"{MIN_SQNR_DB[precision]} dB for {precision} (top-1 agreement "
                          f"{result['top1_agreement']:.1%}, max abs error {result['max_abs_error']:.3g})")
    return result

