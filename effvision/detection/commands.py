"""What ``effvision export`` and ``effvision eval`` do with a detector: a detector dir (or a run
whose newest stage made one) exports whole; an exported detector (its folder or detector.onnx)
or a detector dir is evaluated on a COCO folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.coco import CocoDataConfig
from ..engine.stage import stage_dirs
from ..errors import EffVisionError
from .io import DETECTOR_DIR, DETECTOR_FILE

__all__ = ["newest_detector_dir", "exported_detector_file", "evaluate_target"]


def newest_detector_dir(path: Path) -> Path | None:
    """``path`` itself if it holds a detector, else the newest stage's detector of a run dir when
    that stage is newer than any classifier stage; None otherwise."""
    if (path / DETECTOR_FILE).is_file():
        return path
    if not path.is_dir():
        return None
    for d in stage_dirs(path):  # newest first
        if (d / DETECTOR_DIR / DETECTOR_FILE).is_file():
            return d / DETECTOR_DIR
        if (d / "model" / "model.json").is_file():
            return None
    return None


def exported_detector_file(path: Path) -> Path | None:
    """detector.onnx of an export folder (or the file itself), else None."""
    from .export import DETECTOR_ONNX

    if path.is_file() and path.suffix == ".onnx":
        manifest = path.parent / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("part") == "detector":
            return path
        return path if path.name == DETECTOR_ONNX else None
    return path / DETECTOR_ONNX if (path / DETECTOR_ONNX).is_file() else None


def evaluate_target(target: Path, data_root: str | None, runtime: str = "ort", batch_size: int = 4,
                    limit_images: int | None = None) -> dict[str, Any]:
    """COCO metrics of an exported detector (onnxruntime, or OpenVINO from its model.xml) or of a
    detector dir (PyTorch) on the COCO folder ``data_root``."""
    import torch

    from ..data.coco import CocoSamples, check_coco
    from .evaluate import evaluate_coco
    from .export import ExportedDetector
    from .io import load_detector

    if data_root is None:
        raise EffVisionError("evaluating a detector needs --data, a COCO folder (images/ and annotations/)")
    cfg = CocoDataConfig(root=data_root, limit_images=limit_images, batch_size=batch_size)
    clean, report = check_coco(cfg)
    onnx = exported_detector_file(target)
    if onnx is not None:
        manifest = json.loads((onnx.parent / "manifest.json").read_text()) if (onnx.parent / "manifest.json").is_file() \
            else {}
        categories = manifest.get("categories")
        if runtime == "openvino":
            xml = onnx.parent / "model.xml"
            if not xml.is_file():
                raise EffVisionError(f"{onnx.parent} has no OpenVINO model.xml (export it with --format openvino)")
            model: torch.nn.Module = ExportedDetector(xml, runtime="openvino")
        else:
            model = ExportedDetector(onnx)
        what = {"exported": str(onnx), "runtime": runtime}
    else:
        detector_dir = newest_detector_dir(target)
        if detector_dir is None:
            raise EffVisionError(f"{target} is neither an exported detector (detector.onnx) nor a detector dir")
        model, spec = load_detector(detector_dir)
        categories = spec.categories
        what = {"detector_dir": str(detector_dir), "runtime": "pytorch"}
    if categories is not None and [c["id"] for c in categories] != [c["id"] for c in report.categories]:
        raise EffVisionError(f"{target} was trained on other categories than {data_root} holds")
    metrics = evaluate_coco(model, CocoSamples(cfg, clean, train=False), torch.device("cpu"), batch_size)
    metrics.pop("cocoeval", None)
    return {**what, **metrics}
