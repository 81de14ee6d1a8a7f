"""Inference benchmarks with timm's conventions: warm-up, then many timed batches, medians.

``benchmark(target, backend)`` takes a timm model name, an effvision model dir, a run dir
(its newest model or ONNX file) or an .onnx file, and a backend: ``torch`` (eager),
``compile`` (torch.compile), ``ort`` (onnxruntime, CPU) or ``trt`` (a TensorRT engine built
from the target's ONNX, or a ``.engine`` file, timed with CUDA events). Results are plain dicts.
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .engine.evaluate import autocast
from .errors import EffVisionError
from .models.io import SPEC_FILE, load_model, read_spec
from .models.modes import find_mode

__all__ = ["benchmark", "roundrobin", "BACKENDS", "resolve_target"]

# ort-int8 / openvino-int8: a quantized model's QDQ ONNX; openvino: the ONNX converted to OpenVINO IR
# trt: TensorRT engine (the quantized QDQ graph for a quantized model) on the GPU
BACKENDS = ("torch", "compile", "ort", "ort-int8", "openvino", "openvino-int8", "trt")


def resolve_target(target: str) -> tuple[str, Path | None, Path | None]:
    """(kind, model_dir, onnx_path) for a target; kind is 'timm', 'model_dir', 'run_dir' or 'onnx'."""
    path = Path(target)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise EffVisionError(f"ONNX file not found: {path}")
        return "onnx", None, path
    if path.is_dir():
        exported = _exported_onnx(path)
        if exported is not None:
            return "onnx", None, exported
        if (path / SPEC_FILE).is_file():
            return "model_dir", path, None
        from .engine.stage import stage_dirs

        stages = stage_dirs(path)
        model_dir = next((d / "model" for d in stages if (d / "model" / SPEC_FILE).is_file()), None)
        onnx = next((d / "model.onnx" for d in stages if (d / "model.onnx").is_file()), None)
        if model_dir is None and onnx is None:
            raise EffVisionError(f"{path} holds no model (neither a model dir nor a run dir with one)")
        return "run_dir", model_dir, onnx
    import timm

    import effvision.models  # noqa: F401

    if timm.is_model(target):
        return "timm", None, None
    from .models.io import similar_model_names

    close = similar_model_names(str(target))
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise EffVisionError(f"benchmark target '{target}' is neither a timm model, a model/run dir nor an .onnx file{hint}")


def _exported_onnx(folder: Path) -> Path | None:
    """The one .onnx file an export folder's manifest lists (an exported detector, say), else None."""
    import json

    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    files = [f for f in json.loads(manifest.read_text()).get("files", {}) if f.endswith(".onnx")]
    return folder / files[0] if len(files) == 1 else None


def _manifest_size(onnx_path: Path) -> tuple[int, int] | None:
    """(H, W) an export's manifest names for a graph with free image sides (a whole detector
    resizes any image to it in the graph)."""
    import json

    manifest = onnx_path.parent / "manifest.json"
    if not manifest.is_file():
        return None
    size = json.loads(manifest.read_text()).get("size")
    return (int(size[0]), int(size[1])) if isinstance(size, list) and len(size) == 2 else None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0]}" if str(e).strip() else type(e).__name__


def _ort_session(path: Path, opts: Any = None) -> Any:
    """An onnxruntime CPU session of the user's ONNX file; one that onnxruntime cannot load
    (truncated, not ONNX, a graph whose shapes do not fit) is an EffVisionError naming it."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception alone
        raise EffVisionError(f"{path}: onnxruntime cannot load it: {_first_line(e)}") from e


def _first_call(fn: Callable[[], Any], what: str) -> None:
    """One untimed call: a model or graph that does not run on the input its files describe (an
    input size its architecture refuses, a graph of another dtype) is a user error, not a traceback."""
    try:
        fn()
    except Exception as e:  # torch and onnxruntime raise many types; the user needs the first line
        raise EffVisionError(f"{what} does not run: {_first_line(e)}") from e


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None]) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls; ``sync`` waits for the device."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _torch_model(target: str, kind: str, model_dir: Path | None, img_size: int | None) -> tuple[nn.Module, tuple[int, int, int]]:
    if kind == "timm":
        import timm

        model = timm.create_model(target)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        if img_size:
            size = (size[0], img_size, img_size)
        return model, size  # type: ignore[return-value]
    if model_dir is None:
        raise EffVisionError(f"backend torch/compile needs a PyTorch model; {target} has only ONNX")
    model, spec = load_model(model_dir)
    return model, (spec.in_chans, spec.img_size, spec.img_size)


def benchmark(target: str, backend: str = "torch", device: str = "cpu", batch_size: int = 32,
              img_size: int | None = None, warmup: int = 10, iters: int = 50, amp: str = "auto",
              channels_last: bool = False, threads: int | None = None) -> dict[str, Any]:
    if backend not in BACKENDS:
        raise EffVisionError(f"unknown backend '{backend}' (available: {', '.join(BACKENDS)})")
    if batch_size <= 0 or iters <= 0 or warmup < 0:
        raise EffVisionError("batch size and iters must be positive, warmup non-negative")
    if backend == "trt":  # TensorRT and a GPU first: one line where either is missing
        from effvision.export.tensorrt_runtime import require_trt_cuda

        require_trt_cuda("backend trt")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EffVisionError("device 'cuda' requested but no CUDA GPU is available")
    if threads:
        torch.set_num_threads(threads)
    if backend == "trt" and target.endswith(".engine"):
        times, shape = _bench_trt_engine(Path(target), batch_size, warmup, iters)
        return _summary({"target": target, "backend": backend, "device": "cuda", "batch_size": batch_size,
                         "warmup": warmup, "iters": iters}, times, shape, batch_size)
    kind, model_dir, onnx_path = resolve_target(target)
    result: dict[str, Any] = {"target": target, "backend": backend, "device": str(dev), "batch_size": batch_size,
                              "warmup": warmup, "iters": iters, "threads": torch.get_num_threads()}
    if backend in ("ort-int8", "openvino-int8"):
        onnx_path, tmp_int8 = quantized_onnx(target, model_dir)
        with tmp_int8:
            times, shape = _bench_ort(target, kind, model_dir, onnx_path, img_size, batch_size, warmup, iters, dev,
                                      threads, backend.split("-")[0])
    elif backend == "trt":
        times, shape = _bench_trt(target, kind, model_dir, onnx_path, img_size, batch_size, warmup, iters)
        result["device"] = "cuda"
    elif backend in ("ort", "openvino"):
        times, shape = _bench_ort(target, kind, model_dir, onnx_path, img_size, batch_size, warmup, iters, dev, threads,
                                  backend)
    else:
        model, shape = _torch_model(target, kind, model_dir, img_size)
        model = model.eval().to(dev)
        x = torch.randn(batch_size, *shape, device=dev)
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(dev, amp):
            _first_call(lambda: model(x), f"{target} on a {tuple(x.shape)} input")
        fn_model = model
        if backend == "compile":
            t0 = time.perf_counter()
            fn_model = torch.compile(model)
            with torch.no_grad(), autocast(dev, amp):
                fn_model(x)
            result["compile_s"] = time.perf_counter() - t0
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        def step() -> None:
            with torch.no_grad(), autocast(dev, amp):
                fn_model(x)

        times = time_calls(step, warmup, iters, sync)
        result["amp"] = "bf16" if (amp == "auto" and dev.type == "cuda") else amp
        if dev.type == "cuda":
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return _summary(result, times, shape, batch_size)


def roundrobin(targets: list[str], backend: str = "ort", rounds: int = 7, **kwargs: Any) -> dict[str, list[float]]:
    """img/s of each target per round, the targets timed in turn within every round: load from other
    jobs on the machine falls on all of them alike, so ratios of the medians hold where absolute img/s
    do not. ``kwargs`` go to ``benchmark`` (batch_size, iters, threads...)."""
    from tqdm import tqdm

    rates: dict[str, list[float]] = {t: [] for t in targets}
    with tqdm(total=rounds * len(targets), desc=f"{backend} round-robin", unit="run", leave=False) as bar:
        for _ in range(rounds):
            for target in targets:
                rates[target].append(benchmark(target, backend, **kwargs)["img_per_s"])
                bar.update()
    return rates


def _summary(result: dict[str, Any], times: list[float], shape: tuple[int, ...], batch_size: int) -> dict[str, Any]:
    if "peak_memory_mb" not in result:
        # ru_maxrss is the process's lifetime peak: later backends in one process include earlier ones.
        result["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = statistics.median(times)
    qs = np.percentile(np.array(times), [50, 90])
    result.update(input_shape=[batch_size, *shape], img_per_s=batch_size / med,
                  latency_ms_p50=float(qs[0]) * 1e3, latency_ms_p90=float(qs[1]) * 1e3,
                  times_ms=[round(t * 1e3, 4) for t in times])  # every timed call: the figures' raw numbers
    return result


def _export_fp32(target: str, kind: str, model_dir: Path | None, img_size: int | None, folder: Path) -> Path:
    from effvision.export import OnnxExportConfig, export_onnx

    if kind == "timm":
        model, shape = _torch_model(target, kind, None, img_size)
    else:
        model, spec = load_model(model_dir)  # type: ignore[arg-type]
        shape = (spec.in_chans, spec.img_size, spec.img_size)
    return export_onnx(model, folder / "model.onnx", shape, OnnxExportConfig())


def _bench_ort(target: str, kind: str, model_dir: Path | None, onnx_path: Path | None, img_size: int | None,
               batch_size: int, warmup: int, iters: int, dev: torch.device, threads: int | None,
               runtime: str = "ort"):
    """Times an ONNX graph (the target's, or its fp32 export) in onnxruntime or OpenVINO (CPU)."""
    import onnxruntime as ort

    if dev.type != "cpu":
        raise EffVisionError(f"backend {runtime} runs on the CPU here")
    tmp = None
    if onnx_path is None:
        tmp = tempfile.TemporaryDirectory()
        onnx_path = _export_fp32(target, kind, model_dir, img_size, Path(tmp.name))
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = _ort_session(onnx_path, opts)
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) < 2:
        raise EffVisionError(f"{onnx_path}: bench feeds one batched image tensor; the graph takes "
                             f"{[(i.name, i.shape) for i in inputs]}")
    inp = inputs[0]
    dims = inp.shape[1:]
    if not all(isinstance(d, int) for d in dims):
        size = (img_size, img_size) if img_size else _manifest_size(onnx_path)
        if len(dims) != 3 or not isinstance(dims[0], int) or size is None:
            raise EffVisionError(f"{onnx_path}: input {inp.name} has non-static image dims {dims} (give --img-size)")
        dims = [dims[0], *size]
    if isinstance(inp.shape[0], int) and inp.shape[0] != batch_size:
        raise EffVisionError(f"{onnx_path} has a static batch of {inp.shape[0]}; bench it with --batch-size "
                             f"{inp.shape[0]} or export with a dynamic batch")
    shape = tuple(dims)
    x = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
    if runtime == "openvino":
        from effvision.export.openvino import convert_to_openvino, openvino_session

        with tempfile.TemporaryDirectory() as ir_dir:
            compiled = openvino_session(convert_to_openvino(onnx_path, ir_dir), threads)
        times = time_calls(lambda: compiled(x), warmup, iters, lambda: None)
    else:
        _first_call(lambda: session.run(None, {inp.name: x}), f"{onnx_path} on a float32 {x.shape} input")
        times = time_calls(lambda: session.run(None, {inp.name: x}), warmup, iters, lambda: None)
    if tmp is not None:
        tmp.cleanup()
    return times, shape


def _bench_trt(target: str, kind: str, model_dir: Path | None, onnx_path: Path | None, img_size: int | None,
               batch_size: int, warmup: int, iters: int) -> tuple[list[float], tuple[int, ...]]:
    """Engine for exactly ``batch_size`` from the target's ONNX (a quantized model: its QDQ
    deployable), built in a temporary folder; its parity against onnxruntime is checked first."""
    from effvision.export.tensorrt_runtime import TrtEngine, engine_parity, graph_precision, serialize_engine

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if onnx_path is None and model_dir is not None and _quantization(model_dir) is not None:
            onnx_path, tmp_int8 = quantized_onnx(target, model_dir)
            stack.enter_context(tmp_int8)
        if onnx_path is None:
            onnx_path = _export_fp32(target, kind, model_dir, img_size, tmp)
        inp = _ort_session(onnx_path).get_inputs()[0]
        shape = tuple(inp.shape[1:])
        engine = TrtEngine(serialize_engine(onnx_path, inp.name, shape, (batch_size,) * 3))
        engine_parity(engine, onnx_path, shape, [batch_size], graph_precision(onnx_path))
    x = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
    return engine.time(x, warmup, iters), shape


def _bench_trt_engine(path: Path, batch_size: int, warmup: int, iters: int) -> tuple[list[float], tuple[int, ...]]:
    from effvision.export.tensorrt_runtime import TrtEngine

    if not path.is_file():
        raise EffVisionError(f"engine file not found: {path}")
    engine = TrtEngine(path)
    shape = engine.input_shape()
    x = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
    return engine.time(x, warmup, iters), shape


def _quantization(model_dir: Path) -> dict[str, Any] | None:
    """The ``quantize`` entry's config of a model dir's record (precision, target), or None."""
    entry = find_mode(read_spec(model_dir).modes, "quantize")
    return None if entry is None else entry["config"]


def quantized_onnx(target: str, model_dir: Path | None) -> tuple[Path, tempfile.TemporaryDirectory]:
    """The ``*-int8`` backends' graph: a quantized model's QDQ ONNX for its own target, exported
    (with all checks) into a temporary folder."""
    quant = _quantization(model_dir) if model_dir is not None else None
    if quant is None:
        raise EffVisionError(f"backend ort-int8 needs a quantized model; {target}'s newest model is not "
                             f"(add a 'quantize' stage, or bench an int8 .onnx with backend ort)")
    from effvision.export import DeployConfig, export_deployable

    tmp = tempfile.TemporaryDirectory()
    out = Path(tmp.name) / "int8"
    export_deployable(model_dir, out, DeployConfig(target=quant["target"],
                                                   opset=19 if quant["precision"] == "fp8" else 18))
    return out / "model.onnx", tmp
