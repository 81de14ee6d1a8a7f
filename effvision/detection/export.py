"""Backbone + neck of a detector to ONNX at one fixed size, parity-checked in onnxruntime;
the rest (anchors, RPN/heads, box decoding, NMS) stays in PyTorch.

``OnnxBackbone`` puts the exported part back into the torchvision detector, so the split a
TensorRT deployment uses (engine for the dense part, torchvision for post-processing) runs
and is tested here with onnxruntime.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import EffVisionError
from .io import DetectorSpec, load_detector

__all__ = ["export_backbone", "OnnxBackbone", "BACKBONE_ONNX"]

BACKBONE_ONNX = "backbone.onnx"


class _Maps(nn.Module):
    """The backbone with a tuple output (ONNX graphs return tensors, not dicts)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.body(x).values())


def default_export_size(spec: DetectorSpec, divisor: int) -> tuple[int, int]:
    if spec.fixed_size:
        return tuple(spec.fixed_size)  # type: ignore[return-value]
    side = math.ceil(spec.min_size / math.lcm(32, divisor)) * math.lcm(32, divisor)
    return side, side


def export_backbone(detector_dir: str | Path, out_dir: str | Path, size: tuple[int, int] | None = None,
                    opset: int = 18, atol: float = 1e-3, dynamic_hw: bool = False) -> dict[str, Any]:
    """detector dir -> out_dir/{backbone.onnx, manifest.json}; refuses to overwrite. With
    ``dynamic_hw`` the graph takes any height and width that are multiples of the backbone's
    divisor (checked at the export size and a second, non-square one)."""
    from effvision.attention import export_summary
    from effvision.export import OnnxExportConfig, check_parity, export_onnx, write_manifest

    out_dir = Path(out_dir)
    if (out_dir / BACKBONE_ONNX).exists():
        raise EffVisionError(f"{out_dir / BACKBONE_ONNX} exists already; choose another folder (nothing was overwritten)")
    detector, spec = load_detector(detector_dir)
    body = detector.backbone
    h, w = size or default_export_size(spec, body.divisor)
    if h % body.divisor or w % body.divisor or (body.fixed_size and (h, w) != body.fixed_size):
        raise EffVisionError(f"export size {h}x{w} does not fit backbone {body.spec.name} "
                             f"(multiples of {body.divisor}{', only ' + str(body.fixed_size) if body.fixed_size else ''})")
    if dynamic_hw and body.fixed_size:
        raise EffVisionError(f"dynamic_hw: backbone {body.spec.name} only runs at {body.fixed_size}")
    # A dynamic batch axis, since the detector batches its images in one tensor; H, W as asked.
    cfg = OnnxExportConfig(opset=opset, dynamic_batch=True, parity_batch_sizes=[1, 2], atol=atol,
                           dynamic_hw=dynamic_hw, hw_multiple=math.lcm(32, body.divisor))
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _Maps(body).eval()
    path = export_onnx(model, out_dir / BACKBONE_ONNX, (3, h, w), cfg, output_names=body.names)
    try:
        parity = check_parity(model, path, (3, h, w), cfg.parity_batch_sizes, atol, sizes=cfg.parity_sizes((3, h, w)))
    except EffVisionError:
        path.replace(path.with_suffix(".onnx.failed-parity"))  # kept for inspection, never as backbone.onnx
        raise
    with torch.no_grad():
        shapes = [["batch", *m.shape[1:]] for m in model(torch.zeros(1, 3, h, w))]
    hw_names = [f"height (multiple of {cfg.hw_multiple})", f"width (multiple of {cfg.hw_multiple})"]
    if dynamic_hw:
        shapes = [[*s[:2], f"height / {st}", f"width / {st}"] for s, st in zip(shapes, body.strides)]
    info = {
        "format": "onnx", "opset": opset, "part": "backbone+neck", "detector": spec.kind,
        "backbone": spec.backbone["name"], "source": str(detector_dir),
        "input": {"name": "input", "shape": ["batch", 3, *(hw_names if dynamic_hw else (h, w))], "dtype": "float32",
                  "layout": "NCHW",
                  "preprocessing": "the detector's transform: resize to this size, (x/255 - mean) / std",
                  "mean": list(body.spec.mean), "std": list(body.spec.std)},
        "outputs": [{"name": n, "shape": s, "stride": st} for n, s, st in zip(body.names, shapes, body.strides)],
        "parity": parity,
    }
    sparse = export_summary(body)  # a sparse_attention stage's policies: the export form per kind
    if sparse is not None:
        info["sparse_attention"] = sparse
    write_manifest(out_dir, [BACKBONE_ONNX], info)
    return {"onnx": str(path), "size": [h, w], "dynamic_hw": dynamic_hw, "parity": parity}


class OnnxBackbone(nn.Module):
    """An exported backbone.onnx as a torchvision backbone (onnxruntime, CPU).

    ``detector.backbone = OnnxBackbone(path, detector.backbone.out_channels)``; the detector's
    transform must then produce exactly the exported size (build it with that fixed_size).
    """

    def __init__(self, path: str | Path, out_channels: int) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:  # x: (B, 3, H, W)
        outs = self.session.run(None, {self.session.get_inputs()[0].name: x.detach().float().cpu().numpy()})
        return OrderedDict((n, torch.from_numpy(o).to(x.device)) for n, o in zip(self.names, outs))
