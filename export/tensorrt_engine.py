"""TensorRT engines from a deployable ONNX: built here when the ``tensorrt`` package imports,
else a build_engine.sh with the exact trtexec command for the target machine (engines are
specific to a GPU and a TensorRT version, so building on the target is the normal path).

Strongly typed networks (TensorRT 10+): precision comes from the ONNX (QDQ, fp16 casts),
not from builder flags; on TensorRT 11 that is the only mode."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from effvision.errors import EffVisionError
from effvision.io import atomic_write_json, atomic_write_text

__all__ = ["parse_profile", "trtexec_command", "build_engine", "tensorrt_available"]

ENGINE_FILE, SCRIPT_FILE, CACHE_FILE = "model.engine", "build_engine.sh", "timing.cache"


def parse_profile(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise EffVisionError(f"--profile takes MIN,OPT,MAX batch sizes, e.g. 1,8,32 (got '{text}')") from None
    if not 1 <= lo <= opt <= hi:
        raise EffVisionError(f"--profile {text}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def trtexec_command(onnx_name: str, input_name: str, shape: tuple[int, ...], profile: tuple[int, int, int],
                    target: str, precision: str) -> list[str]:
    dims = "x".join(map(str, shape))
    cmd = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={ENGINE_FILE}", f"--timingCacheFile={CACHE_FILE}",
           f"--minShapes={input_name}:{profile[0]}x{dims}", f"--optShapes={input_name}:{profile[1]}x{dims}",
           f"--maxShapes={input_name}:{profile[2]}x{dims}"]
    if target == "jetpack5":  # TensorRT 8.5 has no strongly typed mode: precision flags instead
        cmd += {"int8": ["--int8", "--fp16"], "fp16": ["--fp16"]}.get(precision, [])
    else:
        cmd.append("--stronglyTyped")
    return cmd


def build_engine(onnx_path: Path, manifest: dict[str, Any], profile: tuple[int, int, int]) -> dict[str, Any]:
    """Engine + engine.json when TensorRT imports, else build_engine.sh; returns what was written."""
    out_dir = onnx_path.parent
    shape = tuple(manifest["input"]["shape"][1:])
    name = manifest["input"]["name"]
    if not tensorrt_available():
        cmd = trtexec_command(onnx_path.name, name, shape, profile, manifest["target"], manifest["precision"])
        script = out_dir / SCRIPT_FILE
        atomic_write_text(script, "#!/usr/bin/env bash\n"
                          f"# Builds the TensorRT engine for {manifest['model']} ({manifest['precision']}, "
                          f"target {manifest['target']}) on the machine that will run it.\n"
                          "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + shlex.join(cmd) + "\n")
        script.chmod(0o755)
        return {"engine": None, "script": str(script), "command": shlex.join(cmd),
                "message": "the tensorrt Python package is not importable here; run build_engine.sh on the "
                           "target machine (TensorRT engines are specific to a GPU and a TensorRT version)"}
    return _build(onnx_path, name, shape, profile)


def _build(onnx_path: Path, input_name: str, shape: tuple[int, ...], profile: tuple[int, int, int]) -> dict[str, Any]:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EffVisionError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    opt = builder.create_optimization_profile()
    opt.set_shape(input_name, *[(b, *shape) for b in profile])
    config.add_optimization_profile(opt)
    cache_path = onnx_path.parent / CACHE_FILE
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise EffVisionError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    (onnx_path.parent / ENGINE_FILE).write_bytes(bytes(engine))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cc = ".".join(map(str, torch.cuda.get_device_capability())) if gpu else None
    info = {"tensorrt": trt.__version__, "gpu": gpu, "compute_capability": cc, "strongly_typed": True,
            "profiles": [{"input": input_name, "min": [profile[0], *shape], "opt": [profile[1], *shape],
                          "max": [profile[2], *shape]}], "onnx": onnx_path.name}
    atomic_write_json(onnx_path.parent / "engine.json", info)
    return {"engine": str(onnx_path.parent / ENGINE_FILE), **info}


def manifest_of(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "manifest.json").read_text())
