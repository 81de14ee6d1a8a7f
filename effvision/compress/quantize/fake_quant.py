"""Fake quantization: a ``Quantizer`` that rounds a tensor to int8 or fp8 (E4M3) and back, and
``QuantLinear``/``QuantConv2d`` that quantize their input (per tensor) and weight (per output
channel, symmetric) before the float op.

Inference and export go through ``effvision::qdq`` (one ONNX QuantizeLinear/DequantizeLinear
pair each); training through aten's fake_quantize ops (straight-through estimator, optional
learnable scales). The calibrated ``amax`` values are plain buffers (parameters when learnable),
so a quantized model saves as safetensors.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .qdq_op import FP8_MAX, qdq

__all__ = ["Quantizer", "QuantLinear", "QuantConv2d", "FP8_MAX", "quant_modules", "swap_module"]


class Quantizer(nn.Module):
    """Symmetric fake-quantizer with a calibrated ``amax``: scalar (per tensor) or one value per
    channel along ``axis``. ``unsigned`` stores int8 as uint8 with zero point 128 (same values;
    the form onnxruntime's CPU kernels run fastest). While ``calibrator`` is set it only observes."""

    def __init__(self, fmt: str = "int8", axis: int | None = None, channels: int = 1, learnable: bool = False,
                 unsigned: bool = False) -> None:
        super().__init__()
        self.fmt, self.axis, self.unsigned = fmt, axis, unsigned
        amax = torch.ones(channels if axis is not None else ())
        if learnable:  # LSQ-style scale learning in QAT
            self.amax = nn.Parameter(amax)
        else:
            self.register_buffer("amax", amax)
        self.learnable = learnable
        self.enabled = True
        self.calibrator = None  # set during calibration (effvision.compress.quantize.calibrate)

    def extra_repr(self) -> str:
        return f"{self.fmt}, axis={self.axis}, unsigned={self.unsigned}, enabled={self.enabled}"

    def scale(self) -> torch.Tensor:
        return self.amax.float().clamp_min(1e-8) / (FP8_MAX if self.fmt == "fp8" else 127.0)

    def zero_point(self, device: torch.device) -> torch.Tensor:
        shape = self.amax.shape
        if self.fmt == "fp8":
            return torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device)
        if self.unsigned:
            return torch.full(shape, 128, dtype=torch.uint8, device=device)
        return torch.zeros(shape, dtype=torch.int8, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrator is not None:
            self.calibrator.observe(x.detach())
            return x
        if not self.enabled:
            return x
        scale = self.scale()
        if not (self.training and torch.is_grad_enabled()):
            return qdq(x, scale, self.zero_point(x.device), self.axis or 0)
        return self._train_forward(x, scale)

    def _train_forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Same values as qdq, through aten ops whose backward is the straight-through estimator."""
        if self.fmt == "fp8":
            shape = [1] * x.dim()
            if self.axis is not None:
                shape[self.axis] = -1
            s = scale.reshape(shape)
            q = (x / s).clamp(-FP8_MAX, FP8_MAX)
            q = q + (q.to(torch.float8_e4m3fn).to(q.dtype) - q).detach()
            return q * s
        zp, lo, hi = (128, 0, 255) if self.unsigned else (0, -128, 127)
        if self.axis is None:
            if self.learnable:
                return torch._fake_quantize_learnable_per_tensor_affine(
                    x, scale.reshape(1), torch.full((1,), float(zp), device=x.device), lo, hi, 1.0)
            return torch.fake_quantize_per_tensor_affine(x, scale, torch.tensor(zp, dtype=torch.int32, device=x.device), lo, hi)
        zps = torch.full(scale.shape, zp, dtype=torch.int32, device=x.device)
        if self.learnable:
            return torch._fake_quantize_learnable_per_channel_affine(x, scale, zps.float(), self.axis, lo, hi, 1.0)
        return torch.fake_quantize_per_channel_affine(x, scale, zps, self.axis, lo, hi)


class _QuantMixin:
    input_quantizer: Quantizer
    weight_quantizer: Quantizer

    def _setup(self, fmt: str, learnable: bool, unsigned_inputs: bool) -> None:
        out_channels = self.weight.shape[0]  # type: ignore[attr-defined]
        self.input_quantizer = Quantizer(fmt, None, learnable=learnable, unsigned=unsigned_inputs)
        # weights: per output channel (axis 0), which is what TensorRT requires
        self.weight_quantizer = Quantizer(fmt, 0, out_channels, learnable=learnable)
        self._update_weight_amax()

    @torch.no_grad()
    def _update_weight_amax(self) -> None:
        w = self.weight.detach().abs()  # type: ignore[attr-defined]
        self.weight_quantizer.amax.copy_(w.reshape(w.shape[0], -1).amax(dim=1))  # (out_channels,)

    def _qweight(self) -> torch.Tensor:
        if self.training and not self.weight_quantizer.learnable:  # QAT: weight scales follow the weights
            self._update_weight_amax()
        return self.weight_quantizer(self.weight)  # type: ignore[attr-defined]


class QuantLinear(nn.Linear, _QuantMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self._qweight(), self.bias)


class QuantConv2d(nn.Conv2d, _QuantMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self._qweight(), self.bias)


_SWAP = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def swap_module(module: nn.Module, fmt: str, learnable: bool = False, unsigned_inputs: bool = False) -> nn.Module:
    """Turn an nn.Linear/nn.Conv2d into its Quant* subclass in place (same parameters)."""
    module.__class__ = _SWAP[type(module)]
    module._setup(fmt, learnable, unsigned_inputs)  # type: ignore[attr-defined]
    return module


def quant_modules(model: nn.Module) -> dict[str, _QuantMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantMixin)}
