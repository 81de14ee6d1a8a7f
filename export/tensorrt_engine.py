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
    except ValueError as e:
        raise EffVisionError(f"--profile takes MIN,OPT,MAX batch sizes, e.g. 1,8,32 (got '{text}')") from e
    if not 1 <= lo <= opt <= hi:
        raise EffVisionError(f"--profile {text}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
    if not tensorrt_available() or not _cuda():
        cmd = trtexec_command(onnx_path.name, name, shape, profile, manifest["target"], manifest["precision"])
        script = out_dir / SCRIPT_FILE
        atomic_write_text(script, "#!/usr/bin/env bash\n"
                          f"# Builds the TensorRT engine for {manifest['model']} ({manifest['precision']}, "
                          f"target {manifest['target']}) on the machine that will run it.\n"
                          "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + shlex.join(cmd) + "\n")
        script.chmod(0o755)
        return {"engine": None, "script": str(script), "command": shlex.join(cmd),
                "message": "TensorRT (the tensorrt Python package and a CUDA GPU) is not available here; run "
                           "build_engine.sh on the "
                           "target machine (TensorRT engines are specific to a GPU and a TensorRT version)"}
    return _build(onnx_path, manifest, profile)


def _build(onnx_path: Path, manifest: dict[str, Any], profile: tuple[int, int, int]) -> dict[str, Any]:
    """Build, then check the engine against onnxruntime on the same inputs before keeping it."""
    import tensorrt as trt
    import torch

    from .manifest import sha256
    from .tensorrt_runtime import TrtEngine, engine_parity, graph_precision, serialize_engine

    out_dir = onnx_path.parent
    input_name, shape = manifest["input"]["name"], tuple(manifest["input"]["shape"][1:])
    engine_bytes = serialize_engine(onnx_path, input_name, shape, profile, out_dir / CACHE_FILE)
    fixed = manifest["input"]["shape"][0]
    sizes = [fixed] if isinstance(fixed, int) else sorted({profile[0], profile[1]})  # smallest and optimal batch
    parity = engine_parity(TrtEngine(engine_bytes), onnx_path, shape, sizes, graph_precision(onnx_path))
    (out_dir / ENGINE_FILE).write_bytes(engine_bytes)  # only an engine that passed parity lands here
    gpu = torch.cuda.get_device_name()
    cc = ".".join(map(str, torch.cuda.get_device_capability()))
    info = {"tensorrt": trt.__version__, "gpu": gpu, "compute_capability": cc,
            "strongly_typed": True, "parity": parity,
            "profiles": [{"input": input_name, "min": [profile[0], *shape], "opt": [profile[1], *shape],
                          "max": [profile[2], *shape]}], "onnx": onnx_path.name}
    atomic_write_json(out_dir / "engine.json", info)
    full = json.loads((out_dir / "manifest.json").read_text())
    full.setdefault("files", {})[ENGINE_FILE] = {"sha256": sha256(out_dir / ENGINE_FILE),
                                                 "bytes": (out_dir / ENGINE_FILE).stat().st_size}
    full["tensorrt_engine"] = {k: info[k] for k in ("tensorrt", "gpu", "compute_capability", "parity")}
    atomic_write_json(out_dir / "manifest.json", full)
    return {"engine": str(out_dir / ENGINE_FILE), **info}


def manifest_of(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "manifest.json").read_text())
