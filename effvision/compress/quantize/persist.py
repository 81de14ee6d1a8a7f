"""A quantized model on disk: the usual spec + safetensors (the calibrated amax values are
buffers in the state dict), with the ``quantize`` mode in the spec's record naming the format
and the quantized modules, so ``effvision.models.io.load_model`` rebuilds the fake-quant model
in a fresh process, no pickle. (Model dirs from before the record kept this in quant.json;
``models.io.read_spec`` migrates them.)"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn as nn

from ...errors import EffVisionError
from ...models.io import ModelSpec, read_spec
from ...models.modes import find_mode
from .fake_quant import Quantizer, swap_module

__all__ = ["MODE", "restore_quantized", "quantization", "quantizers_off", "read_quant_spec"]

MODE = "quantize"


def restore_quantized(model: nn.Module, config: dict[str, Any], metadata: dict[str, Any]) -> None:
    """The ``quantize`` mode's restore: the named modules swapped to their fake-quant form (the
    calibrated ranges then load with the weights)."""
    modules = dict(model.named_modules())
    for name in metadata["modules"]:
        if name not in modules:
            raise EffVisionError(f"quantized module '{name}' is not in the model")
        swap_module(modules[name], config["precision"], config.get("learnable_scales", False),
                    config["target"] == "ort-cpu")


def quantization(spec: ModelSpec) -> dict[str, Any] | None:
    """The quantization a spec's record holds, flat (precision, target, learnable_scales, modules,
    calibration, fallback, int8_layers: what exports and manifests report), or None."""
    entry = find_mode(spec.modes, MODE)
    if entry is None:
        return None
    cfg = entry["config"]
    return {"precision": cfg["precision"], "target": cfg["target"],
            "learnable_scales": cfg.get("learnable_scales", False), **entry["metadata"]}


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its fake quantizers switched off (the float model: what onnxruntime's own
    INT8 quantization starts from); switched back on after."""
    quantizers = [q for q in model.modules() if isinstance(q, Quantizer) and q.enabled]
    for q in quantizers:
        q.enabled = False
    try:
        yield model
    finally:
        for q in quantizers:
            q.enabled = True


def read_quant_spec(directory: str | Path) -> dict[str, Any] | None:
    """The quantization of the model dir ``directory`` (``quantization`` of its spec), or None."""
    return quantization(read_spec(directory))
