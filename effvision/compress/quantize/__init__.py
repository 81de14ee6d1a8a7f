"""Quantization: int8/fp8 fake quantization (PTQ with calibration, QAT through the trainer),
sensitivity analysis with float fallback, and persistence without pickle (the ``quantize`` mode)."""
from .api import QuantReport, quantize_, top1, update_quant_record
from .calibrate import CALIB_METHODS, calibrate
from .config import TARGETS, QuantConfig
from .fake_quant import QuantConv2d, QuantLinear, Quantizer, quant_modules
from .persist import MODE, quantization, read_quant_spec, restore_quantized

__all__ = ["QuantConfig", "QuantReport", "quantize_", "top1", "update_quant_record", "calibrate", "CALIB_METHODS",
           "TARGETS", "Quantizer", "QuantLinear", "QuantConv2d", "quant_modules", "MODE", "quantization",
           "read_quant_spec", "restore_quantized"]
