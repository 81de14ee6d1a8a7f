"""Export an effvision model directory (spec + safetensors) to a folder of deployables."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from effvision.errors import EffVisionError
from effvision.models.io import load_model, read_spec

from .hooks import manifest_sections, quantization_of

from .manifest import classifier_io, write_manifest
from .onnx import OnnxExportConfig, check_parity, export_onnx

__all__ = ["export_model_dir", "ONNX_FILE"]

ONNX_FILE = "model.onnx"


def export_model_dir(model_dir: str | Path, out_dir: str | Path, cfg: OnnxExportConfig,
                     fmt: str = "onnx", portable: bool = False) -> dict[str, Any]:
    """model dir -> out_dir/{model.onnx, manifest.json} (``openvino``: also model.xml/.bin from that
    ONNX, parity-checked against onnxruntime); refuses to overwrite an existing export.
    ``portable``: standard ONNX only (a quantized ort-cpu model keeps its QDQ graph, no contrib ops)."""
    if fmt not in ("onnx", "openvino"):
        raise EffVisionError(f"unknown export format '{fmt}' (available: onnx, openvino)")
    if fmt == "openvino":
        from .openvino import require_openvino

        require_openvino()  # missing OpenVINO is an error before any work
        result = export_model_dir(model_dir, out_dir, cfg, "onnx", portable=True)  # OpenVINO reads standard ONNX
        from .openvino import add_openvino

        spec = read_spec(model_dir)
        int8 = quantization_of(spec) is not None
        try:
            result.update(add_openvino(out_dir, (spec.in_chans, spec.img_size, spec.img_size),
                                       cfg.parity_batch_sizes, cfg.atol, int8))
        except EffVisionError:
            Path(out_dir, ONNX_FILE).replace(Path(out_dir, ONNX_FILE + ".failed-openvino"))
            raise
        return result
    quant = quantization_of(read_spec(model_dir))
    if quant is not None:  # quantized: QDQ ONNX for its target, with that target's checks
        from .deploy import DeployConfig, export_deployable

        return export_deployable(model_dir, out_dir, DeployConfig(opset=cfg.opset, dynamic_batch=cfg.dynamic_batch,
                                                                  parity_batch_sizes=cfg.parity_batch_sizes,
                                                                  target=quant["target"],
                                                                  ort_int8_form="qdq" if portable else "dynamic"))
    out_dir = Path(out_dir)
    if (out_dir / ONNX_FILE).exists():
        raise EffVisionError(f"{out_dir / ONNX_FILE} exists already; choose another --out (nothing was overwritten)")
    model, spec = load_model(model_dir)
    shape = (spec.in_chans, spec.img_size, spec.img_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = export_onnx(model, out_dir / ONNX_FILE, shape, cfg)
    try:
        parity = check_parity(model, path, shape, cfg.parity_batch_sizes, cfg.atol, sizes=cfg.parity_sizes(shape))
    except EffVisionError:
        path.replace(path.with_suffix(".onnx.failed-parity"))  # keep it for inspection, never as model.onnx
        raise
    info = {
        "format": "onnx", "opset": cfg.opset, "model": spec.name, "source": str(model_dir),
        **classifier_io(spec, tuple(shape), cfg.dynamic_batch), "parity": parity,
    }
    if cfg.dynamic_hw:
        info["input"]["shape"][2:] = [f"height (multiple of {cfg.hw_multiple})", f"width (multiple of {cfg.hw_multiple})"]
        info["parity"]["sizes"] = cfg.parity_sizes(shape)
    info.update(manifest_sections(model))  # what the model's modes say about their export form (sparse attention)
    write_manifest(out_dir, [ONNX_FILE], info)
    return {"onnx": str(path), **{k: info[k] for k in ("opset", "model")}, "parity": parity}
