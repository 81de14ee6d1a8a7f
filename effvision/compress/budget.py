"""Global budgets: find the pruning ratio that brings params, MACs or measured latency to a
fraction of the dense model's.

The ratio is searched by bisection on copies pruned by magnitude: the sizes a ratio gives
do not depend on the criterion, so the real criterion (and its calibration data) runs once,
at the ratio found. Latency is measured on the chosen backend because fewer MACs do not
always run faster (small or odd channel counts, memory-bound layers); measuring is the
point of a latency budget.

Latency is noisy on a shared machine, so it is measured robustly and remembered:
- each trial alternates with the dense model call by call (load from other jobs hits both
  alike) and its fraction is the median of the adjacent pairs' ratios;
- every measured (ratio -> fraction) goes into a per-machine latency table (as nn-Meter and
  HALP keep one), a JSON file keyed by model, input, kinds, backend, machine and versions,
  under ``$EFFVISION_CACHE`` (default ``~/.cache/effvision``). A rerun on the same machine reads
  the table instead of the clock, so the bisection takes the same path and gives the same
  architecture.

``allocation: halp`` replaces the one ratio by per-layer widths (``halp.py``); its table of layer
widths is a ``LatencyTable`` too, in its own file.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from ..bench import time_calls
from ..errors import ConfigError, EffVisionError
from .prune import PruneSpec, model_macs_params, prune_

__all__ = ["BudgetSpec", "LatencyTable", "search_ratio", "measure", "latency_fraction"]


@dataclass
class BudgetSpec:
    metric: Literal["macs", "params", "latency"] = "macs"
    fraction: float = 0.5                       # of the dense model's value
    backend: Literal["torch", "ort"] = "torch"   # latency only
    device: Literal["cpu", "cuda"] = "cpu"       # latency only (ort: cpu)
    batch_size: int = 32                         # latency only
    iters: int = 10                              # latency only: timed pairs per round
    rounds: int = 5                              # latency only: rounds (rounds * iters pairs in all)
    cache: bool = True                           # latency only: reuse this machine's latency table
    allocation: Literal["uniform", "halp"] = "uniform"  # one ratio for all, or per layer (HALP knapsack)

    def validate(self, where: str) -> None:
        if not 0 < self.fraction < 1:
            raise ConfigError(f"{where}.fraction: {self.fraction} is outside (0, 1)")
        if self.batch_size <= 0 or self.iters <= 0 or self.rounds <= 0:
            raise ConfigError(f"{where}: batch_size, iters and rounds must be positive")
        if self.metric == "latency" and self.backend == "ort" and self.device != "cpu":
            raise ConfigError(f"{where}: backend ort measures on the cpu here")
        if self.allocation == "halp" and self.metric != "latency":
            raise ConfigError(f"{where}.allocation: halp allocates measured latency; use metric latency "
                              f"(or allocation uniform for {self.metric})")


def _runner(model: nn.Module, shape: tuple[int, ...], budget: BudgetSpec, stack: ExitStack) -> Callable[[], object]:
    """A no-argument call that runs one batch of ``model`` on the budget's backend."""
    x = torch.randn(budget.batch_size, *shape[1:])
    if budget.backend == "ort":
        import onnxruntime as ort

        from effvision.export import OnnxExportConfig, export_onnx

        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_onnx(copy.deepcopy(model).eval(), Path(tmp) / "m.onnx", tuple(shape[1:]), OnnxExportConfig())
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name, xn = session.get_inputs()[0].name, x.numpy()
        return lambda: session.run(None, {name: xn})
    dev = torch.device(budget.device)
    model = copy.deepcopy(model).eval().to(dev)
    x = x.to(dev)

    def run() -> None:
        with torch.no_grad():
            model(x)
    return run


def latency_fraction(model: nn.Module, dense: nn.Module, example: torch.Tensor, budget: BudgetSpec) -> float:
    """Latency of ``model`` over ``dense``: the two alternate call by call and the fraction is the
    median of the adjacent pairs' ratios, so load from other jobs hits both alike."""
    dev = torch.device(budget.device if budget.backend == "torch" else "cpu")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with ExitStack() as stack:
        shape = tuple(example.shape)
        run_model, run_dense = _runner(model, shape, budget, stack), _runner(dense, shape, budget, stack)
        for fn in (run_model, run_dense):
            time_calls(fn, 3, 1, sync)  # warm-up
        ratios = [time_calls(run_model, 0, 1, sync)[0] / time_calls(run_dense, 0, 1, sync)[0]
                  for _ in range(budget.rounds * budget.iters)]
    return statistics.median(ratios)


class LatencyTable:
    """This machine's measured latency fractions for one (model, input, kinds, backend) setting,
    as {ratio: fraction}; a JSON file that later searches read instead of the clock."""

    def __init__(self, key: dict[str, Any], enabled: bool = True) -> None:
        root = Path(os.environ.get("EFFVISION_CACHE", Path.home() / ".cache" / "effvision"))
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.key, self.enabled = key, enabled
        self.path = root / "latency" / f"{key['model']}-{digest}.json"
        self.entries: dict[str, float] = {}
        if enabled and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("key") == key:
                    self.entries = {str(k): float(v) for k, v in data["fractions"].items()}
            except (ValueError, KeyError, TypeError):
                self.entries = {}  # a damaged table is measured again, never trusted
        self.reused = bool(self.entries)

    @classmethod
    def for_search(cls, model: nn.Module, example: torch.Tensor, kinds: list[str], budget: BudgetSpec,
                   base: PruneSpec, max_ratio: float | None = None) -> "LatencyTable":
        """The table of uniform ratios, or with ``budget.allocation == "halp"`` (its own file) of layer
        widths and allocations (the widths offered depend on ``max_ratio``)."""
        key = _table_key(model, example, kinds, budget, base)
        if budget.allocation == "halp":
            key.update(allocation="halp", max_ratio=max_ratio)
        return cls(key, enabled=budget.cache)

    def get(self, ratio: float, measure_fn: Callable[[], float]) -> float:
        return self.lookup(f"{ratio:.6f}", measure_fn)

    def lookup(self, name: str, measure_fn: Callable[[], float]) -> float:
        """The entry ``name``, measured (and saved) only when the table lacks it."""
        if name not in self.entries:
            self.update({name: measure_fn()})
        return self.entries[name]

    def update(self, entries: dict[str, float]) -> None:
        self.entries.update(entries)
        if self.enabled:
            from ..io import atomic_write_text

            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"key": self.key, "fractions": self.entries}, indent=1))


def _table_key(model: nn.Module, example: torch.Tensor, kinds: list[str], budget: BudgetSpec,
               base: PruneSpec) -> dict[str, Any]:
    from ..runinfo import cpu_name
    from effvision.export.manifest import package_versions

    machine = torch.cuda.get_device_name() if budget.device == "cuda" and budget.backend == "torch" else cpu_name()
    versions = package_versions()
    shapes = hashlib.sha256(str([(n, tuple(p.shape)) for n, p in model.state_dict().items()]).encode()).hexdigest()
    return {"model": type(model).__name__, "shapes": shapes[:16], "input": list(example.shape[1:]),
            "batch_size": budget.batch_size, "kinds": sorted(kinds), "round_to": base.round_to,
            "ignore": sorted(base.ignore), "backend": budget.backend, "device": budget.device,
            "threads": torch.get_num_threads(), "machine": machine, "cores": os.cpu_count(),
            "versions": {k: versions.get(k) for k in ("torch", "onnxruntime", "timm")}}


def measure(model: nn.Module, example: torch.Tensor, budget: BudgetSpec) -> float:
    """MACs or params (latency is only meaningful as a fraction: ``latency_fraction``)."""
    macs, params = model_macs_params(model, example[:1])
    return float(macs if budget.metric == "macs" else params)


def search_ratio(model: nn.Module, example: torch.Tensor, kinds: list[str], budget: BudgetSpec,
                 base: PruneSpec, max_ratio: float = 0.9, tries: int = 7,
                 table: LatencyTable | None = None) -> tuple[float, float]:
    """The smallest uniform ratio over ``kinds`` whose pruned model meets the budget.

    Returns (ratio, achieved fraction). Raises when even ``max_ratio`` misses the budget.
    Latency budgets read and extend ``table`` (by default this machine's table for the setting).
    """
    if budget.metric == "latency" and table is None:
        table = LatencyTable.for_search(model, example, kinds, budget, base)
    dense = measure(model, example, budget) if budget.metric != "latency" else 1.0

    def pruned(ratio: float) -> nn.Module:
        trial = copy.deepcopy(model)
        spec = PruneSpec(ratios={k: ratio for k in kinds}, criterion="l1", round_to=base.round_to, ignore=base.ignore)
        prune_(trial, spec, example)
        return trial

    def fraction(ratio: float) -> float:
        if table is not None:
            return table.get(ratio, lambda: latency_fraction(pruned(ratio), model, example, budget))
        return measure(pruned(ratio), example, budget) / dense

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
