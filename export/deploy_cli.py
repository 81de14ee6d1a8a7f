"""`effvision export --format tensorrt|--precision|--target`: the deployable ONNX, then an
engine (or build_engine.sh) for --format tensorrt."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from effvision.models.io import read_spec

from .deploy import DeployConfig, export_deployable
from .hooks import quantization_of
from .tensorrt_engine import build_engine, manifest_of, parse_profile

__all__ = ["export_for_target"]


def export_for_target(model_dir: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    profile = parse_profile(args.profile) if args.format == "tensorrt" else None  # bad input before work
    quant = quantization_of(read_spec(model_dir))
    target = args.target or (quant["target"] if quant else "tensorrt")
    if args.format == "tensorrt" and target == "ort-cpu":
        from effvision.errors import EffVisionError

        raise EffVisionError("--format tensorrt needs --target tensorrt or jetpack5, not ort-cpu")
    cfg = DeployConfig(opset=args.opset, target=target, precision=args.precision,
                       dynamic_batch=not args.static_batch, atol=args.atol,
                       tensorrt_check=getattr(args, "trt_check", "auto"),
                       ort_optimize=getattr(args, "ort_optimize", None) is not None,
                       ort_fused_attention=getattr(args, "ort_optimize", None) == "fused-attention")
    result = export_deployable(model_dir, out, cfg)
    if profile is not None:
        engine = build_engine(out / "model.onnx", manifest_of(out), profile)
        if engine.get("message"):
            print(f"effvision: {engine['message']}: {engine['script']}", file=sys.stderr)
        result["tensorrt"] = engine
    return result
