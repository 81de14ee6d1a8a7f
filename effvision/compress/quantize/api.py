"""``quantize_(model, cfg, calib, val)``: fake-quantize a model in place, calibrate it, and
(with an accuracy budget) fall back the most sensitive layers to float until the drop fits."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from ...errors import EffVisionError
from ...models.modes import add_mode, check_next, record_of, update_metadata
from .calibrate import calibrate, calibrate_with
from .config import QuantConfig
from .fake_quant import QuantLinear, quant_modules, swap_module
from .persist import MODE

__all__ = ["quantize_", "QuantReport", "convert_quantized", "unquantize_module", "update_quant_record", "top1"]

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, C, H, W), labels (B,)


@dataclass
class QuantReport:
    quantized: list[str]
    calib_samples: int
    float_top1: float | None = None
    quant_top1: float | None = None
    sensitivity: dict[str, float] = field(default_factory=dict)  # top-1 drop with only that layer quantized
    fallback: list[str] = field(default_factory=list)            # layers returned to float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def top1(model: nn.Module, batches: list[Batch]) -> float:
    was = model.training
    model.eval()
    hit = n = 0
    for x, y in batches:
        hit += int((model(x).argmax(1) == y).sum())
        n += len(y)
    model.train(was)
    return 100.0 * hit / max(n, 1)


def check_calibration_set(batches: list[Batch], cfg: QuantConfig) -> int:
    n = sum(len(x) for x, _ in batches[: cfg.calib_batches])
    if n == 0:
        raise EffVisionError("the calibration set is empty")
    if n < cfg.min_calib_samples:
        raise EffVisionError(f"the calibration set is too small: {n} images < min_calib_samples "
                             f"{cfg.min_calib_samples}")
    return n


def quantize_(model: nn.Module, cfg: QuantConfig, calib: list[Batch] | Callable[[nn.Module], Any],
              val: list[Batch] | None = None, progress: bool = True) -> QuantReport:
    """``calib``: (x, y) batches, or a forward loop ``calib(model)`` that runs the calibration
    data through the model (ModelOpt's convention; any data pipeline, any input format). The
    model's record gains a ``quantize`` entry (the config, and the quantized modules)."""
    check_next(record_of(model), MODE)  # e.g. quantized already: refused before any work
    if not callable(calib):
        check_calibration_set(calib, cfg)
    targets = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)
               and not any(fnmatch.fnmatchcase(n, p) for p in cfg.exclude)]
    if not targets:
        raise EffVisionError("nothing to quantize: the model has no nn.Linear/nn.Conv2d outside 'exclude'")
    float_top1 = top1(model, val) if val else None
    modules = dict(model.named_modules())
    for name in targets:
        swap_module(modules[name], cfg.precision, cfg.learnable_scales, cfg.target == "ort-cpu")
    if callable(calib):
        seen = calibrate_with(model, calib, cfg.calib_method, cfg.percentile)
        if seen < cfg.min_calib_samples:
            raise EffVisionError(f"the calibration loop ran {seen} images < min_calib_samples {cfg.min_calib_samples}")
    else:
        seen = calibrate(model, (x for x, _ in calib), cfg.calib_batches, cfg.calib_method, cfg.percentile, progress)
    report = QuantReport(quantized=sorted(quant_modules(model)), calib_samples=seen, float_top1=float_top1)
    if val:
        report.quant_top1 = top1(model, val)
    if cfg.accuracy_budget is not None and val and float_top1 - report.quant_top1 > cfg.accuracy_budget:
        report.sensitivity = sensitivity(model, val, float_top1, progress)
        for name in sorted(report.sensitivity, key=report.sensitivity.get, reverse=True):
            unquantize_module(modules[name])
            report.fallback.append(name)
            report.quant_top1 = top1(model, val)
            if float_top1 - report.quant_top1 <= cfg.accuracy_budget:
                break
        report.quantized = sorted(quant_modules(model))
    add_mode(model, MODE, cfg, {"modules": report.quantized, "calibration": {"method": cfg.calib_method,
                                "batches": cfg.calib_batches, "samples": seen},
                                "fallback": report.fallback, "int8_layers": {"mode": "all"}})
    return report


def convert_quantized(model: nn.Module, cfg: QuantConfig, calib: list[torch.Tensor] | None) -> dict[str, Any]:
    """The ``quantize`` mode's verb in the mode signature: calibrated on ``calib``'s images."""
    batches = [(x, torch.zeros(len(x), dtype=torch.long, device=x.device)) for x in calib or []]
    return quantize_(model, cfg, batches, progress=False).to_dict()


def update_quant_record(model: nn.Module, **metadata: Any) -> None:
    """After a verb that changes which layers stay quantized (``measured``): the record's
    ``quantize`` entry names the quantized modules again, with ``metadata`` merged in."""
    update_metadata(model, MODE, modules=sorted(quant_modules(model)), **metadata)


def _set_enabled(m: nn.Module, on: bool) -> None:
    m.input_quantizer.enabled = m.weight_quantizer.enabled = on  # type: ignore[union-attr]


def sensitivity(model: nn.Module, val: list[Batch], float_top1: float, progress: bool = True) -> dict[str, float]:
    """Per layer: top-1 drop vs float with only that layer quantized (the others in float)."""
    mods = quant_modules(model)
    for m in mods.values():
        _set_enabled(m, False)
    out = {}
    for name, m in tqdm(mods.items(), desc="sensitivity", disable=not progress, leave=False):
        _set_enabled(m, True)
        out[name] = float_top1 - top1(model, val)
        _set_enabled(m, False)
    for m in mods.values():
        _set_enabled(m, True)
    return out


def unquantize_module(m: nn.Module) -> None:
    """Back to the plain float layer (same parameters, quantizers dropped)."""
    del m.input_quantizer, m.weight_quantizer
    m.__class__ = nn.Linear if isinstance(m, QuantLinear) else nn.Conv2d
