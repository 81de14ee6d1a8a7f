"""Quantization: int8/fp8 fake quantization (PTQ with calibration, QAT through the trainer),
sensitivity analysis with float fallback, and persistence without pickle."""
from .api import QuantReport, quantize_, top1
from .calibrate import CALIB_METHODS, calibrate
from .config import TARGETS, QuantConfig
from .fake_quant import QuantConv2d, QuantLinear, Quantizer, quant_modules
from .persist import QUANT_FILE, apply_quant_spec, quant_spec, read_quant_spec, write_quant_spec

__all__ = ["QuantConfig", "QuantReport", "quantize_", "top1", "calibrate", "CALIB_METHODS", "TARGETS",
           "Quantizer", "QuantLinear", "QuantConv2d", "quant_modules", "QUANT_FILE", "apply_quant_spec",
           "quant_spec", "read_quant_spec", "write_quant_spec"]
