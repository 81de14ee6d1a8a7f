"""manifest.json beside exported files: what a deployment needs to feed the model and to
check that the files are the ones that passed parity."""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

import torch

from effvision.io import atomic_write_json

__all__ = ["sha256", "write_manifest", "package_versions", "classifier_io"]


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("effvision", "torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxscript", "tensorrt", "openvino"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    out["torch"] = torch.__version__
    return out


def classifier_io(spec: Any, shape: tuple[int, ...], dynamic_batch: bool) -> dict[str, Any]:
    """The manifest's input, output, preprocessing and class names for an image classifier
    (``spec``: effvision.models.io.ModelSpec; ``shape``: (C, H, W))."""
    batch = "batch" if dynamic_batch else 1
    return {
        "input": {"name": "input", "shape": [batch, *shape], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": [batch, spec.num_classes]},
        "preprocessing": {"size": spec.img_size, "mean": list(spec.mean), "std": list(spec.std),
                          "scale": "pixels / 255, then (x - mean) / std"},
        "class_names": spec.class_names,
    }


def write_manifest(directory: str | Path, files: list[str], info: dict[str, Any]) -> Path:
    directory = Path(directory)
    manifest = {**info, "versions": package_versions(),
                "files": {name: {"sha256": sha256(directory / name), "bytes": (directory / name).stat().st_size}
                          for name in files}}
    path = directory / "manifest.json"
    atomic_write_json(path, manifest)
    return path
