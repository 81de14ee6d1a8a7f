"""The ``qat:`` block of a train or finetune stage (a trainer extension): the model is
quantized (fake-quant layers, calibrated on the stage's first training batches) before the
Trainer is built, so the stage trains it quantization-aware with the straight-through
estimator. (A stage that trains a model quantized by an earlier ``quantize`` stage is QAT
already; it needs no ``qat:`` block.)"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from ...errors import ConfigError
from .api import quantize_
from .config import QuantConfig

__all__ = ["setup_qat"]


def setup_qat(blocks: dict[str, Any], ts: Any) -> None:
    cfg: QuantConfig = blocks["qat"]
    if cfg.int8_layers != "all" or cfg.accuracy_budget is not None:
        raise ConfigError(f"{ts.where}.qat: int8_layers and accuracy_budget are quantize-stage options "
                          f"(they judge a calibrated model); use a quantize stage with qat_epochs")
    calib = [(x, y) for x, y in itertools.islice(ts.loaders.train.epoch(0), cfg.calib_batches)]
    report = quantize_(ts.model.to(ts.device).eval(), cfg, calib, progress=ts.dist.is_main)
    ts.model.train()
    # Fake quantization trains in fp32: the calibrated ranges are fp32 values (as the quantize stage's QAT).
    ts.cfg = dataclasses.replace(ts.cfg, amp="off")
    ts.summary["qat"] = {"precision": cfg.precision, "target": cfg.target, "quantized_layers": len(report.quantized),
                         "calib_samples": report.calib_samples, "amp": "off"}
