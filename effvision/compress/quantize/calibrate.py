"""Activation calibration: observe each input quantizer over N batches, then set its amax by
max, percentile or MSE.

Hand-written (about 40 lines) because the methods are short and need to work on our own
Quantizer buffers; they follow the usual definitions (TensorRT/modelopt calibrators):
max = largest |x| seen; percentile = that quantile of |x|; mse = the clipping value, among
candidates up to max, that minimises the mean squared int8 quantization error on the samples.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from ...errors import EffVisionError
from .fake_quant import Quantizer
from .qdq_op import FP8_MAX

__all__ = ["Calibrator", "calibrate", "calibrate_with", "CALIB_METHODS"]

CALIB_METHODS = ("max", "percentile", "mse")
_SAMPLES_PER_BATCH = 1 << 16  # a random subset of |x| per batch bounds memory on large activations


class Calibrator:
    def __init__(self, method: str, percentile: float, fmt: str, seed: int = 0) -> None:
        self.method, self.percentile, self.fmt = method, percentile, fmt
        self.max = 0.0
        self.samples: list[torch.Tensor] = []
        self.g = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        a = x.float().abs().flatten().cpu()
        self.max = max(self.max, float(a.max()))
        if self.method != "max":
            if a.numel() > _SAMPLES_PER_BATCH:
                a = a[torch.randint(a.numel(), (_SAMPLES_PER_BATCH,), generator=self.g)]
            self.samples.append(a)

    def amax(self) -> float:
        if self.method == "max" or self.max == 0.0:
            return self.max
        a = torch.cat(self.samples)
        if self.method == "percentile":
            return float(torch.quantile(a, self.percentile / 100.0))
        return self._mse(a)

    def _mse(self, a: torch.Tensor) -> float:
        best, best_err = self.max, float("inf")
        for frac in torch.linspace(0.3, 1.0, 36):  # candidate clipping points
            amax = float(frac) * self.max
            if self.fmt == "fp8":
                s = amax / FP8_MAX
                q = (a / s).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float() * s
            else:
                s = amax / 127.0
                q = (a / s).round().clamp(max=127) * s
            err = float(((q - a) ** 2).mean())
            if err < best_err:
                best, best_err = amax, err
        return best


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int, method: str = "max",
              percentile: float = 99.99, progress: bool = True) -> int:
    """Run ``num_batches`` batches through ``model`` observing every enabled activation quantizer,
    then set their amax. Returns the number of samples seen."""
    def forward_loop(m: nn.Module) -> None:
        bar = tqdm(total=num_batches, desc=f"calibrate ({method})", disable=not progress, leave=False)
        for x in itertools.islice(batches, num_batches):
            m(x)
            bar.update(1)
        bar.close()

    return calibrate_with(model, forward_loop, method, percentile)


@torch.no_grad()
def calibrate_with(model: nn.Module, forward_loop: Callable[[nn.Module], Any], method: str = "max",
                   percentile: float = 99.99) -> int:
    """``forward_loop(model)`` runs the calibration data through ``model`` (ModelOpt's convention)
    while every enabled activation quantizer observes; then their amax is set. Returns the
    number of samples seen."""
    quantizers = [q for n, q in model.named_modules() if isinstance(q, Quantizer)
                  and q.axis is None and q.enabled]
    for q in quantizers:
        q.calibrator = Calibrator(method, percentile, q.fmt)
    seen = [0]
    count = model.register_forward_pre_hook(lambda m, args: seen.__setitem__(0, seen[0] + len(args[0])))
    was_training = model.training
    model.eval()
    try:
        forward_loop(model)
        if seen[0] == 0:
            raise EffVisionError("calibration saw no data (empty calibration set)")
        for q in quantizers:
            q.amax.data.fill_(max(q.calibrator.amax(), 1e-8))  # type: ignore[union-attr]
    finally:
        count.remove()
        for q in quantizers:
            q.calibrator = None
        model.train(was_training)
    return seen[0]
