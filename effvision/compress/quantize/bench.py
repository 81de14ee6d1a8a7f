"""The ``ort-int8`` benchmark backend: a quantized model's QDQ ONNX for its own target,
exported (with all checks) into a temporary folder."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ...errors import EffVisionError
from .persist import read_quant_spec

__all__ = ["quantized_onnx"]


def quantized_onnx(target: str, model_dir: Path | None) -> tuple[Path, tempfile.TemporaryDirectory]:
    quant = read_quant_spec(model_dir) if model_dir is not None else None
    if quant is None:
        raise EffVisionError(f"backend ort-int8 needs a quantized model; {target}'s newest model is not "
                             f"(add a 'quantize' stage, or bench an int8 .onnx with backend ort)")
    from effvision.export import DeployConfig, export_deployable

    tmp = tempfile.TemporaryDirectory()
    out = Path(tmp.name) / "int8"
    export_deployable(model_dir, out, DeployConfig(target=quant["target"], opset=19 if quant["precision"] == "fp8" else 18))
    return out / "model.onnx", tmp
