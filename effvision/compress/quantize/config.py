"""The quantization config: what to quantize, to which format, for which runtime."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...errors import ConfigError

__all__ = ["QuantConfig", "TARGETS"]

TARGETS = ("tensorrt", "ort-cpu")


@dataclass
class QuantConfig:
    """Post-training quantization: the precision (int8/fp8), the runtime the QDQ form targets,
    the calibration, the layers kept in float, and an optional accuracy budget or measured INT8 layers."""

    precision: Literal["int8", "fp8"] = "int8"     # fp16/bf16 need no calibration: an export precision
    target: Literal["tensorrt", "ort-cpu"] = "tensorrt"  # picks the QDQ form the runtime runs fastest
    calib_method: Literal["max", "percentile", "mse"] = "max"
    percentile: float = 99.99                        # for calib_method percentile
    calib_batches: int = 8                           # batches of the training split to calibrate on
    min_calib_samples: int = 32                      # fewer images than this: an error, not a poor model
    exclude: list[str] = field(default_factory=list)  # module names (fnmatch) kept in float
    accuracy_budget: float | None = None             # max top-1 drop (points) before layers fall back
    learnable_scales: bool = False                   # QAT learns amax (LSQ) instead of keeping it fixed
    # measured: a group of layers stays INT8 only where the runtime runs it measurably faster (measured.py)
    int8_layers: Literal["all", "measured"] = "all"
    int8_groups: Literal["block", "layer"] = "block"  # what is judged together: a block's layers, or each layer
    int8_runtime: Literal["auto", "onnxruntime", "tensorrt"] = "auto"  # auto: TensorRT for target tensorrt where it runs
    int8_min_wins: float = 0.8                       # INT8 kept where it was faster in >= this share of rounds
    int8_rounds: int = 15                            # round-robin timing rounds (medians of paired ratios)
    int8_batch_size: int = 8                         # images per timed call

    def validate(self, where: str) -> None:
        if self.calib_batches < 1:
            raise ConfigError(f"{where}.calib_batches: at least 1 (got {self.calib_batches})")
        if self.min_calib_samples < 1:
            raise ConfigError(f"{where}.min_calib_samples: at least 1")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"{where}.percentile: in (50, 100] (got {self.percentile})")
        if self.accuracy_budget is not None and self.accuracy_budget < 0:
            raise ConfigError(f"{where}.accuracy_budget: non-negative points (got {self.accuracy_budget})")
        if self.int8_rounds < 3 or self.int8_batch_size < 1 or not 0.5 < self.int8_min_wins <= 1.0:
            raise ConfigError(f"{where}: int8_rounds >= 3, int8_batch_size >= 1, 0.5 < int8_min_wins <= 1 "
                              f"(got {self.int8_rounds}, {self.int8_batch_size}, {self.int8_min_wins})")
        if self.int8_layers == "measured" and self.int8_runtime == "onnxruntime" and self.precision == "fp8":
            raise ConfigError(f"{where}.int8_runtime: fp8 is measured on TensorRT, not onnxruntime")
        if self.precision == "fp8" and self.target == "ort-cpu":
            raise ConfigError(f"{where}: precision fp8 runs on TensorRT (Hopper+), not target ort-cpu")
