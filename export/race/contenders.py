"""The CPU race's contenders: one registration each (name, runtime, precision, the package it
needs and the extra that installs it, and how it is built). A builder writes the contender's
files into its own folder and returns how to run it; everything derives from one fp32 ONNX
graph (effvision's export + onnxslim), so the runtimes race on the same network.

Runtimes and forms (why each is here: docs/deployment.md, "CPU runtime race"):
- onnxruntime fp32; effvision's INT8 (dynamic quantization of the weight MatMuls, per-tensor int8
  weights); onnxruntime's own ``quantize_dynamic`` with its defaults (the peer form); static
  calibrated INT8 with float outputs (``ort_static.py``);
- OpenVINO fp32 on the same graph; NNCF's post-training INT8 on OpenVINO (model type
  transformer for ViTs: SmoothQuant and the transformer ignored scope); the static QDQ graph read
  by OpenVINO (effvision's QDQ-to-OpenVINO path, kept only where it wins);
- torch eager and ``torch.compile`` (inductor, one compile per batch size);
- ExecuTorch with the XNNPACK delegate (the ``executorch`` extra).
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from effvision.errors import EffVisionError

__all__ = ["Contender", "BuildContext", "Registration", "REGISTRY", "Unavailable", "missing_package"]

Runner = Callable[[np.ndarray], np.ndarray]  # (B, C, H, W) float32 -> (B, classes) logits


class Unavailable(EffVisionError):
    """A contender whose runtime is not installed here (the message names the extra)."""


@dataclass
class BuildContext:
    model: nn.Module                 # the float model, eval mode
    model_dir: Path
    shape: tuple[int, int, int]      # (C, H, W)
    calibration: np.ndarray          # (N, C, H, W) float32, normalized as the model expects
    threads: int
    transformer: bool                # a ViT: NNCF's transformer model type
    batch_sizes: list[int]           # the race's (ExecuTorch programs have one static shape each)
    built: dict[str, "Contender"] = field(default_factory=dict)  # by name, in build order

    def fp32_onnx(self) -> Path:
        return self.built["ort-fp32"].folder / "model.onnx"


@dataclass
class Contender:
    name: str
    runtime: str                     # onnxruntime | openvino | torch
    precision: str                   # fp32 | int8
    folder: Path
    files: list[str]                 # the artifact, relative to folder
    record: dict[str, Any]           # how it was made (the manifest's entry)
    make_runner: Callable[[int], Runner]  # threads -> runner


@dataclass(frozen=True)
class Registration:
    name: str
    runtime: str
    precision: str
    requires: tuple[str, ...]        # importable packages
    extra: str                       # pip install 'effvision[EXTRA]'
    build: Callable[[BuildContext, Path], Contender]
    needs: tuple[str, ...] = ()      # contenders built first (their files are this one's input)
    description: str = ""


def missing_package(reg: Registration) -> str | None:
    """The first package ``reg`` needs that does not import here, or None."""
    for package in reg.requires:
        try:
            if importlib.util.find_spec(package) is None:
                return package
        except ValueError:  # sys.modules[package] is None: its import is blocked
            return package
    return None


def _ort_runner(path: Path) -> Callable[[int], Runner]:
    def make(threads: int) -> Runner:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    return make


def _openvino_runner(xml: Path) -> Callable[[int], Runner]:
    """One compiled model per input shape: OpenVINO's CPU plugin runs a static shape faster than
    the dynamic batch of the file (vit_micro at batch 1: ~0.2x onnxruntime dynamic, measured)."""
    def make(threads: int) -> Runner:
        from ..openvino import require_openvino

        ov = require_openvino()
        core, compiled = ov.Core(), {}

        def run(x: np.ndarray) -> np.ndarray:
            if x.shape not in compiled:
                model = core.read_model(str(xml))
                model.reshape(list(x.shape))
                compiled[x.shape] = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
            return np.asarray(compiled[x.shape](x)[0])
        return run
    return make


def _build_ort_fp32(ctx: BuildContext, folder: Path) -> Contender:
    from ..deploy import _slim
    from ..onnx import OnnxExportConfig, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        raw = export_onnx(ctx.model, Path(tmp) / "raw.onnx", ctx.shape, OnnxExportConfig())  # parity vs torch inside
        _slim(raw, folder / "model.onnx")
    return Contender("ort-fp32", "onnxruntime", "fp32", folder, ["model.onnx"],
                     {"form": "effvision export (torch.export) + onnxslim"}, _ort_runner(folder / "model.onnx"))


def _build_ort_int8_dynamic(ctx: BuildContext, folder: Path) -> Contender:
    from ..ort_optimize import quantize_dynamic_int8

    record = quantize_dynamic_int8(ctx.fp32_onnx(), folder / "model.onnx")
    return Contender("ort-int8-dynamic", "onnxruntime", "int8", folder, ["model.onnx"], record,
                     _ort_runner(folder / "model.onnx"))


def _build_ort_quantize_dynamic(ctx: BuildContext, folder: Path) -> Contender:
    """onnxruntime's quantize_dynamic with its own defaults (every op type it quantizes): the peer."""
    from ..ort_optimize import quantize_dynamic_int8

    record = quantize_dynamic_int8(ctx.fp32_onnx(), folder / "model.onnx", op_types=None)
    return Contender("ort-quantize-dynamic", "onnxruntime", "int8", folder, ["model.onnx"],
                     {**record, "form": "onnxruntime quantize_dynamic, default op types (weight QInt8)"},
                     _ort_runner(folder / "model.onnx"))


def _build_ort_int8_static(ctx: BuildContext, folder: Path) -> Contender:
    from ..ort_static import quantize_static_int8

    record = quantize_static_int8(ctx.fp32_onnx(), folder / "model.onnx", ctx.calibration)
    return Contender("ort-int8-static", "onnxruntime", "int8", folder, ["model.onnx"], record,
                     _ort_runner(folder / "model.onnx"))


def _build_openvino_fp32(ctx: BuildContext, folder: Path) -> Contender:
    from ..openvino import convert_to_openvino

    xml = convert_to_openvino(ctx.fp32_onnx(), folder)
    return Contender("openvino-fp32", "openvino", "fp32", folder, ["model.xml", "model.bin"],
                     {"form": "OpenVINO IR of the fp32 ONNX (fp32 weights)"}, _openvino_runner(xml))


def _build_openvino_qdq(ctx: BuildContext, folder: Path) -> Contender:
    from ..openvino import convert_to_openvino

    xml = convert_to_openvino(ctx.built["ort-int8-static"].folder / "model.onnx", folder)
    return Contender("openvino-int8-qdq", "openvino", "int8", folder, ["model.xml", "model.bin"],
                     {"form": "OpenVINO IR of the static QDQ graph (Q/DQ become FakeQuantize)"}, _openvino_runner(xml))


def _build_openvino_nncf(ctx: BuildContext, folder: Path) -> Contender:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(ctx.built["openvino-fp32"].folder / "model.xml"))
    samples = [ctx.calibration[i:i + 1] for i in range(len(ctx.calibration))]
    kwargs: dict[str, Any] = {"subset_size": len(samples)}
    if ctx.transformer:  # SmoothQuant and the transformer ignored scope (NNCF's recipe for ViTs)
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    try:
        quantized = nncf.quantize(model, nncf.Dataset(samples), **kwargs)
    except Exception as e:  # NNCF raises its own and OpenVINO's types; the race records the first line
        raise EffVisionError(f"NNCF quantization failed: {str(e).strip().splitlines()[0]}") from e
    ov.save_model(quantized, str(folder / "model.xml"), compress_to_fp16=False)
    return Contender("openvino-int8-nncf", "openvino", "int8", folder, ["model.xml", "model.bin"],
                     {"form": "NNCF post-training quantization (OpenVINO)", "calibration_images": len(samples),
                      "model_type": "transformer" if ctx.transformer else "default", "nncf": nncf.__version__},
                     _openvino_runner(folder / "model.xml"))


def _copy_model_dir(ctx: BuildContext, folder: Path) -> list[str]:
    files = sorted(p.name for p in ctx.model_dir.iterdir() if p.is_file())
    for name in files:
        shutil.copy2(ctx.model_dir / name, folder / name)
    return files


def _torch_runner(model: nn.Module, compile_it: bool) -> Callable[[int], Runner]:
    def make(threads: int) -> Runner:
        torch.set_num_threads(threads)
        fn = torch.compile(model, dynamic=False) if compile_it else model

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return fn(torch.from_numpy(x)).float().numpy()
        return run
    return make


def _build_torch_eager(ctx: BuildContext, folder: Path) -> Contender:
    return Contender("torch-eager", "torch", "fp32", folder, _copy_model_dir(ctx, folder),
                     {"form": "the model dir, run in PyTorch eager (effvision.load)"}, _torch_runner(ctx.model, False))


def _build_torch_compile(ctx: BuildContext, folder: Path) -> Contender:
    return Contender("torch-compile", "torch", "fp32", folder, _copy_model_dir(ctx, folder),
                     {"form": "the model dir, run with torch.compile (inductor; compiles per batch size)"},
                     _torch_runner(ctx.model, True))


def _executorch_runner(folder: Path, batch_sizes: list[int]) -> Callable[[int], Runner]:
    def make(threads: int) -> Runner:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _unsafe_reset_threadpool(threads)  # XNNPACK's pool takes the race's thread count, like the others
        runtime = Runtime.get()
        methods = {b: runtime.load_program(str(folder / f"model-b{b}.pte")).load_method("forward")
                   for b in batch_sizes}

        def run(x: np.ndarray) -> np.ndarray:
            return methods[len(x)].execute([torch.from_numpy(x)])[0].numpy()
        return run
    return make


def _build_executorch(ctx: BuildContext, folder: Path) -> Contender:
    """One XNNPACK-lowered program per batch size: the dynamic-batch program failed set_inputs
    at run time (executorch 1.5.1), and static shapes are XNNPACK's fast path anyway."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    files = []
    for b in ctx.batch_sizes:
        program = torch.export.export(ctx.model, (torch.randn(b, *ctx.shape),))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
        files.append(f"model-b{b}.pte")
        (folder / files[-1]).write_bytes(lowered.buffer)
    return Contender("executorch-xnnpack", "executorch", "fp32", folder, files,
                     {"form": "torch.export -> ExecuTorch, XNNPACK delegate, one program per batch size"},
                     _executorch_runner(folder, ctx.batch_sizes))


REGISTRY: dict[str, Registration] = {r.name: r for r in [
    Registration("ort-fp32", "onnxruntime", "fp32", ("onnxruntime", "onnxslim"), "onnx", _build_ort_fp32,
                 description="onnxruntime, effvision's fp32 export"),
    Registration("ort-int8-dynamic", "onnxruntime", "int8", ("onnxruntime",), "onnx", _build_ort_int8_dynamic,
                 ("ort-fp32",), "effvision's ort-cpu INT8: dynamic, weight MatMuls"),
    Registration("ort-quantize-dynamic", "onnxruntime", "int8", ("onnxruntime",), "onnx",
                 _build_ort_quantize_dynamic, ("ort-fp32",), "onnxruntime quantize_dynamic, its defaults"),
    Registration("ort-int8-static", "onnxruntime", "int8", ("onnxruntime",), "onnx", _build_ort_int8_static,
                 ("ort-fp32",), "static calibrated INT8 (QDQ, float outputs)"),
    Registration("openvino-fp32", "openvino", "fp32", ("openvino",), "openvino", _build_openvino_fp32,
                 ("ort-fp32",), "OpenVINO on the fp32 graph"),
    Registration("openvino-int8-nncf", "openvino", "int8", ("openvino", "nncf"), "openvino", _build_openvino_nncf,
                 ("openvino-fp32",), "NNCF post-training INT8 on OpenVINO"),
    Registration("openvino-int8-qdq", "openvino", "int8", ("openvino",), "openvino", _build_openvino_qdq,
                 ("ort-int8-static",), "OpenVINO on the static QDQ graph"),
    Registration("torch-eager", "torch", "fp32", ("torch",), "", _build_torch_eager,
                 description="PyTorch eager"),
    Registration("torch-compile", "torch", "fp32", ("torch",), "", _build_torch_compile,
                 description="torch.compile (inductor)"),
    Registration("executorch-xnnpack", "executorch", "fp32", ("executorch",), "executorch", _build_executorch,
                 description="ExecuTorch with the XNNPACK delegate"),
]}
