"""OpenVINO IR (model.xml + model.bin) from the parity-checked ONNX, for Intel CPUs and edge
devices. OpenVINO reads the same graph onnxruntime runs: an fp32 export, or a quantized model's
QDQ graph (its Q/DQ pairs become OpenVINO FakeQuantize, which its CPU plugin runs in INT8).

Parity is checked against onnxruntime on that ONNX file: fp32 by max abs error; INT8 by the
signal-to-quantization-noise ratio of the logits (two INT8 engines round differently, so exact
agreement is not expected), with top-1 agreement and the max error reported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from effvision.errors import EffVisionError

from .manifest import package_versions, sha256
from .onnx import ParityError

__all__ = ["convert_to_openvino", "check_openvino_parity", "add_openvino", "openvino_session", "require_openvino",
           "OPENVINO_FILES"]

OPENVINO_FILES = ("model.xml", "model.bin")


def require_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise EffVisionError("OpenVINO is not installed: pip install 'effvision[openvino]' "
                             "(or pip install openvino)") from e
    return openvino


def convert_to_openvino(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """``out_dir/model.xml`` (+ model.bin) from an ONNX file; weights stay fp32 (no fp16 compression,
    so fp32 parity holds)."""
    ov = require_openvino()
    xml = Path(out_dir) / OPENVINO_FILES[0]
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:  # OpenVINO's frontend raises its own types; one line for the user
        raise EffVisionError(f"OpenVINO cannot convert {onnx_path}: {str(e).strip().splitlines()[0]}") from e
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


def openvino_session(xml: str | Path, threads: int | None = None) -> Any:
    """A compiled OpenVINO CPU model (call it with one array, index [0] for the first output)."""
    ov = require_openvino()
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    return ov.Core().compile_model(str(xml), "CPU", config)


def check_openvino_parity(xml: str | Path, onnx_path: str | Path, input_shape: tuple[int, int, int],
                          batch_sizes: list[int], atol: float = 1e-4, int8: bool = False,
                          min_sqnr_db: float = 20.0, seed: int = 0) -> dict[str, Any]:
    """OpenVINO vs onnxruntime on the same inputs; raises ParityError beyond the limits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    compiled = openvino_session(xml)
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int):
        batch_sizes = [fixed]
    rng = np.random.default_rng(seed)
    worst, agree, total, signal, noise = 0.0, 0, 0, 0.0, 0.0
    for b in batch_sizes:
        x = rng.standard_normal((b, *input_shape), dtype=np.float32)
        ref = session.run(None, {session.get_inputs()[0].name: x})[0]  # (B, K)
        out = np.asarray(compiled(x)[0])
        if out.shape != ref.shape:
            raise ParityError(f"OpenVINO output shape {out.shape} != onnxruntime {ref.shape} at batch {b}")
        worst = max(worst, float(np.abs(out - ref).max()))
        agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
        total += b
        signal, noise = signal + float((ref.astype(np.float64) ** 2).sum()), noise + float(((out - ref) ** 2).sum())
    sqnr = 10 * np.log10(signal / noise) if noise > 0 else float("inf")
    result = {"max_abs_error_vs_onnxruntime": worst, "sqnr_db_vs_onnxruntime": float(sqnr),
              "top1_agreement": agree / total, "images": total, "openvino": package_versions().get("openvino")}
    if int8:
        result["min_sqnr_db"] = min_sqnr_db
        if not sqnr >= min_sqnr_db:
            raise ParityError(f"OpenVINO INT8 parity failed: logit SQNR vs onnxruntime {sqnr:.1f} dB < {min_sqnr_db} dB "
                              f"(top-1 agreement {agree / total:.1%}, max abs error {worst:.3g})")
    else:
        result["atol"] = atol
        if not worst <= atol:
            raise ParityError(f"OpenVINO parity failed: max abs error vs onnxruntime {worst:.3g} > {atol:g}")
    return result


def add_openvino(out_dir: str | Path, input_shape: tuple[int, int, int], batch_sizes: list[int],
                 atol: float, int8: bool) -> dict[str, Any]:
    """Convert ``out_dir/model.onnx`` (an export with its manifest) to OpenVINO IR beside it,
    check parity, and add the IR files and the check to ``manifest.json``."""
    out_dir = Path(out_dir)
    onnx_path = out_dir / "model.onnx"
    xml = convert_to_openvino(onnx_path, out_dir)
    try:
        # More images for INT8: agreement is a rate; 64 random images at the parity batch sizes.
        sizes = batch_sizes if not int8 else [max(batch_sizes)] * max(1, 64 // max(batch_sizes))
        parity = check_openvino_parity(xml, onnx_path, input_shape, sizes, atol, int8)
    except EffVisionError:
        for name in OPENVINO_FILES:  # never leave an unchecked IR beside the checked ONNX
            (out_dir / name).unlink(missing_ok=True)
        raise
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.setdefault("files", {}).update(
        {name: {"sha256": sha256(out_dir / name), "bytes": (out_dir / name).stat().st_size} for name in OPENVINO_FILES})
    manifest["openvino"] = {"xml": OPENVINO_FILES[0], "parity": parity}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return {"openvino": str(xml), "openvino_parity": parity}
