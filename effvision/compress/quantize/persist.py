"""A quantized model on disk: the usual spec + safetensors (the calibrated amax values are
buffers in the state dict) plus quant.json naming the quantized modules and the format, so
``effvision.models.io.load_model`` rebuilds the fake-quant model in a fresh process, no pickle."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from ...errors import EffVisionError
from ...io import atomic_write_text
from .fake_quant import quant_modules, swap_module

__all__ = ["QUANT_FILE", "write_quant_spec", "apply_quant_spec", "read_quant_spec"]

QUANT_FILE = "quant.json"
_VERSION = 1


def quant_spec(model: nn.Module, precision: str, target: str, learnable: bool, **extra: Any) -> dict[str, Any]:
    return {"version": _VERSION, "precision": precision, "target": target, "learnable_scales": learnable,
            "modules": sorted(quant_modules(model)), **extra}


def write_quant_spec(directory: str | Path, spec: dict[str, Any]) -> Path:
    path = Path(directory) / QUANT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(spec, indent=2))
    return path


def read_quant_spec(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / QUANT_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EffVisionError(f"corrupt quantization spec {path}: {e}") from None
    if spec.get("version") != _VERSION:
        raise EffVisionError(f"{path}: unsupported version {spec.get('version')} (this effvision reads {_VERSION})")
    return spec


def apply_quant_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Swap the named modules to their fake-quant form (weights then load as usual)."""
    modules = dict(model.named_modules())
    for name in spec["modules"]:
        if name not in modules:
            raise EffVisionError(f"quantized module '{name}' is not in the model")
        swap_module(modules[name], spec["precision"], spec.get("learnable_scales", False), spec["target"] == "ort-cpu")
    return model
