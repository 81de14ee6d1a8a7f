"""Global budgets: find the pruning ratio that brings params, MACs or measured latency to a
fraction of the dense model's.

The ratio is searched by bisection on copies pruned by magnitude: the sizes a ratio gives
do not depend on the criterion, so the real criterion (and its calibration data) runs once,
at the ratio found. Latency is measured on the chosen backend because fewer MACs do not
always run faster (small or odd channel counts, memory-bound layers); measuring is the
point of a latency budget.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from ..bench import time_calls
from ..errors import ConfigError, EffVisionError
from .prune import PruneSpec, model_macs_params, prune_

__all__ = ["BudgetSpec", "search_ratio", "measure"]


@dataclass
class BudgetSpec:
    metric: Literal["macs", "params", "latency"] = "macs"
    fraction: float = 0.5                       # of the dense model's value
    backend: Literal["torch", "ort"] = "torch"   # latency only
    device: Literal["cpu", "cuda"] = "cpu"       # latency only (ort: cpu)
    batch_size: int = 32                         # latency only
    iters: int = 10                              # latency only: timed runs (median)

    def validate(self, where: str) -> None:
        if not 0 < self.fraction < 1:
            raise ConfigError(f"{where}.fraction: {self.fraction} is outside (0, 1)")
        if self.batch_size <= 0 or self.iters <= 0:
            raise ConfigError(f"{where}: batch_size and iters must be positive")
        if self.metric == "latency" and self.backend == "ort" and self.device != "cpu":
            raise ConfigError(f"{where}: backend ort measures on the cpu here")


def _latency(model: nn.Module, shape: tuple[int, ...], budget: BudgetSpec) -> float:
    dev = torch.device(budget.device)
    x = torch.randn(budget.batch_size, *shape[1:])
    if budget.backend == "ort":
        import onnxruntime as ort

        from effvision.export import OnnxExportConfig, export_onnx

        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_onnx(copy.deepcopy(model).eval(), Path(tmp) / "m.onnx", tuple(shape[1:]), OnnxExportConfig())
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return _median(lambda: session.run(None, {name: x.numpy()}), budget.iters, lambda: None)
    model = model.eval().to(dev)
    x = x.to(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        result = _median(lambda: model(x), budget.iters, sync)
    model.cpu()
    return result


def _median(fn: Callable[[], object], iters: int, sync: Callable[[], None]) -> float:
    return statistics.median(time_calls(fn, 3, iters, sync))


def measure(model: nn.Module, example: torch.Tensor, budget: BudgetSpec) -> float:
    if budget.metric == "latency":
        return _latency(model, tuple(example.shape), budget)
    macs, params = model_macs_params(model, example[:1])
    return float(macs if budget.metric == "macs" else params)


def search_ratio(model: nn.Module, example: torch.Tensor, kinds: list[str], budget: BudgetSpec,
                 base: PruneSpec, max_ratio: float = 0.9, tries: int = 7) -> tuple[float, float]:
    """The smallest uniform ratio over ``kinds`` whose pruned model meets the budget.

    Returns (ratio, achieved fraction). Raises when even ``max_ratio`` misses the budget.
    """
    dense = measure(model, example, budget)

    def fraction(ratio: float) -> float:
        trial = copy.deepcopy(model)
        spec = PruneSpec(ratios={k: ratio for k in kinds}, criterion="l1", round_to=base.round_to, ignore=base.ignore)
        prune_(trial, spec, example)
        return measure(trial, example, budget) / dense

    top = fraction(max_ratio)
    if top > budget.fraction:
        raise EffVisionError(f"budget {budget.metric} <= {budget.fraction:.0%} of dense cannot be reached: pruning "
                             f"{', '.join(kinds)} by {max_ratio:.0%} leaves {top:.0%}")
    lo, hi, best = 0.0, max_ratio, top
    for _ in range(tries):
        mid = (lo + hi) / 2
        f = fraction(mid)
        if f <= budget.fraction:
            hi, best = mid, f
        else:
            lo = mid
    return hi, best
