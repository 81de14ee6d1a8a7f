"""Per-layer pruning under a latency budget: HALP's latency-saliency knapsack (Shen et al.,
"Structural Pruning via Latency-Saliency Knapsack", NeurIPS 2022), for timm ViTs.

A uniform ratio removes the same share of every block's heads and MLP units. Here every block's
attention (how many heads it keeps) and MLP (how many hidden units) is an item with a few
widths to choose from; each width has

- a **value**: the importance it keeps, the sum of the criterion's scores (``importance.py``:
  taylor, l2, ...) of its best heads / units, on the raw scale (no per-layer normalisation, so
  layers compare);
- a **cost**: its measured latency, read from a per-machine table of layer widths (one block's
  norm + attention with h heads, norm + MLP with m units, at the model's token count and batch,
  on the budget's backend), timed round-robin (every variant and the whole dense model called in
  turn, medians), cached like ``budget.LatencyTable`` so that a rerun reads the table.

The allocation maximises the kept value under the latency the budget allows, then the pruned
model's whole latency is measured against dense (``latency_fraction``) and the layers' share is
rescaled if the sum of layer latencies mispredicted it (fusions across layers, call overhead).
"""
from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from timm.layers import Mlp
from timm.layers.attention import Attention

from ..bench import time_calls
from ..errors import EffVisionError
from .budget import BudgetSpec, LatencyTable, _runner, latency_fraction
from .importance import get_criterion
from .prune import Batches, PruneSpec, kinds_of, prune_

__all__ = ["Layer", "layers_of", "solve_knapsack", "layer_latencies", "layer_values", "allocate", "round_robin",
           "round_robin_times"]

HALP_KINDS = ("heads", "mlp")
TOLERANCE = 0.03   # accept a measured fraction this far under the budget; closer is not worth more tries


@dataclass
class Layer:
    """One prunable item: a block's attention (width = heads) or MLP (width = hidden units)."""

    name: str            # the module pruned: "blocks.0.attn" (heads) or "blocks.0.mlp.fc1" (units)
    kind: str            # heads | mlp
    dim: int             # the block's input width
    full: int            # the dense width
    widths: list[int]    # the widths it may keep, ascending (the last is ``full``)


def _levels(full: int, kind: str, round_to: int | None, max_ratio: float) -> list[int]:
    """Widths a layer may keep: every head count; MLP units in about 16 steps, multiples of round_to."""
    least = max(1, math.ceil(full * (1 - max_ratio)))
    if kind == "heads":
        return list(range(least, full + 1))
    q = round_to or 1
    step = q * math.ceil(max(1, full // 16) / q)
    return sorted({full, *(w for w in range(step, full, step) if w >= least)})


def layers_of(model: nn.Module, kinds: Sequence[str], round_to: int | None, max_ratio: float) -> list[Layer]:
    names = {id(m): n for n, m in model.named_modules()}
    found = kinds_of(model)
    layers: list[Layer] = []
    if "heads" in kinds:
        layers += [Layer(names[id(a)], "heads", a.qkv.in_features, a.num_heads,
                         _levels(a.num_heads, "heads", None, max_ratio))
                   for a in found["heads"] if a.num_heads > 1]
    if "mlp" in kinds:
        layers += [Layer(names[id(f)], "mlp", f.in_features, f.out_features,
                         _levels(f.out_features, "mlp", round_to, max_ratio))
                   for f in found["mlp"]]
    return sorted(layers, key=lambda l: l.name)


# ---- the solver: a pure function of costs, values and capacity ------------------------------------

def solve_knapsack(costs: Sequence[Sequence[float]], values: Sequence[Sequence[float]], capacity: float,
                   bins: int = 2000) -> list[int] | None:
    """Pick one option per item, maximising the summed value with the summed cost <= ``capacity``.

    Dynamic programming over costs discretised into ``bins`` steps of capacity/bins, each cost
    rounded up (so a pick that fits in steps fits for real). DP rather than HALP's greedy
    value/cost ordering because it is exact for this multiple-choice form, where latency is not
    monotone or convex in width (a narrower layer can run slower: odd sizes miss fast kernels), and
    cheap at ViT sizes (items x options x bins = 24 x 16 x 2000). Ties keep the first option found, so
    the result is deterministic. Returns the option index per item, or None when nothing fits.
    """
    if capacity <= 0:
        return None
    unit = capacity / bins
    steps = [[math.ceil(c / unit - 1e-9) for c in item] for item in costs]
    neg = -math.inf
    best = [0.0] * (bins + 1)          # best[c]: best value of the items so far within c steps
    picks: list[list[int]] = []
    for item_steps, item_values in zip(steps, values):
        new, pick = [neg] * (bins + 1), [-1] * (bins + 1)
        for c in range(bins + 1):
            for o, (s, v) in enumerate(zip(item_steps, item_values)):
                if s <= c and best[c - s] != neg and best[c - s] + v > new[c]:
                    new[c], pick[c] = best[c - s] + v, o
        best = new
        picks.append(pick)
    if best[bins] == neg:
        return None
    chosen, c = [], bins
    for item_steps, pick in zip(reversed(steps), reversed(picks)):
        o = pick[c]
        chosen.append(o)
        c -= item_steps[o]
    return chosen[::-1]


# ---- the latency table of layer widths -------------------------------------------------------------

def round_robin_times(runners: dict[str, Callable[[], object]], cycles: int,
                      sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of every call of each runner, called in turn ``cycles`` times (load hits all alike)."""
    for fn in runners.values():
        time_calls(fn, 3, 1, sync)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(cycles):
        for k, fn in runners.items():
            times[k].append(time_calls(fn, 0, 1, sync)[0])
    return times


def round_robin(runners: dict[str, Callable[[], object]], cycles: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each runner (``round_robin_times``)."""
    return {k: statistics.median(v) for k, v in round_robin_times(runners, cycles, sync).items()}


def _variant(model: nn.Module, layer: Layer, width: int) -> nn.Module:
    """One block's norm + attention with ``width`` heads, or norm + MLP with ``width`` units."""
    module = model.get_submodule(layer.name)
    if layer.kind == "heads":
        assert isinstance(module, Attention)
        dim = module.qkv.in_features
        attn = Attention(dim, num_heads=width, attn_head_dim=module.head_dim, qkv_bias=module.qkv.bias is not None)
        return nn.Sequential(nn.LayerNorm(dim), attn)
    assert isinstance(module, nn.Linear)
    mlp = model.get_submodule(layer.name.rpartition(".")[0])
    act = type(mlp.act) if isinstance(mlp, Mlp) else nn.GELU
    return nn.Sequential(nn.LayerNorm(module.in_features), Mlp(module.in_features, width, act_layer=act))


def _entry(layer: Layer, width: int) -> str:
    # blocks of equal size share entries: the table is of layer widths, not of layers
    return f"{layer.kind}:{layer.dim}:{width}"


def layer_latencies(model: nn.Module, example: torch.Tensor, layers: list[Layer], budget: BudgetSpec,
                    cycles: int) -> dict[str, float]:
    """Seconds per call of every layer variant and of the whole model ("model"), round-robin."""
    with torch.no_grad():
        tokens = model.forward_features(example[:1]).shape  # (1, N, D): the blocks' input
    wanted: dict[str, nn.Module] = {}
    for layer in layers:
        for w in layer.widths:
            wanted.setdefault(_entry(layer, w), _variant(model, layer, w))
    dev = torch.device(budget.device if budget.backend == "torch" else "cpu")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with ExitStack() as stack:
        runners = {"model": _runner(model, tuple(example.shape), budget, stack)}
        runners.update({k: _runner(m, tuple(tokens), budget, stack) for k, m in wanted.items()})
        return round_robin(runners, cycles, sync)


# ---- values: the criterion's importance per head / unit --------------------------------------------

def layer_values(model: nn.Module, example: torch.Tensor, layers: list[Layer], criterion: str,
                 batches: Batches | None) -> dict[str, list[float]]:
    """For each layer, the importance kept at each of its widths (the sum of its best heads/units)."""
    crit = get_criterion(criterion)
    if crit.needs_data and not batches:
        raise EffVisionError(f"criterion '{criterion}' needs calibration batches")
    work = copy.deepcopy(model)
    imp = crit.build()
    if hasattr(imp, "normalizer"):
        imp.normalizer = None  # Torch-Pruning divides each group by its mean: layers would not compare
    if crit.calibrate is not None:
        work.train()
        crit.calibrate(work, imp, batches or [])
    work.eval()
    graph = tp.DependencyGraph().build_dependency(work, example_inputs=example)
    out: dict[str, list[float]] = {}
    for layer in layers:
        module = work.get_submodule(layer.name)
        root = module.qkv if layer.kind == "heads" else module
        group = graph.get_pruning_group(root, tp.prune_linear_out_channels, idxs=list(range(root.out_features)))
        scores = imp(group)  # (out_features,) one score per channel of the group's root
        if scores is None:
            raise EffVisionError(f"criterion '{criterion}' gave no importance for {layer.name}")
        # heads: Torch-Pruning ranks heads by contiguous chunks of the group's scores; so do we
        unit = scores.detach().float().view(layer.full, -1).sum(1) if layer.kind == "heads" else scores.detach().float()
        ranked = torch.sort(unit, descending=True).values.cumsum(0)  # kept value of the best k
        out[layer.name] = [float(ranked[w - 1]) for w in layer.widths]
    return out


# ---- the allocation ---------------------------------------------------------------------------------

def _fit(layers: list[Layer], lat: dict[str, float], values: dict[str, list[float]],
         target: float) -> tuple[list[int], float] | None:
    """Widths whose summed layer latency brings the estimated model latency to ``target`` of dense."""
    dense_layers = sum(lat[_entry(l, l.full)] for l in layers)
    capacity = dense_layers - (1 - target) * lat["model"]
    costs = [[lat[_entry(l, w)] for w in l.widths] for l in layers]
    picks = solve_knapsack(costs, [values[l.name] for l in layers], capacity)
    if picks is None:
        return None
    chosen = sum(c[o] for c, o in zip(costs, picks))
    return [l.widths[o] for l, o in zip(layers, picks)], (lat["model"] - dense_layers + chosen) / lat["model"]


def layer_ratios(layers: list[Layer], widths: Sequence[int]) -> dict[str, float]:
    """``PruneSpec.layers`` for these widths: Torch-Pruning takes ratios; the small offset makes its
    ceil (heads) and int (units) land on the exact count."""
    return {l.name: (l.full - w) / l.full - 1e-6 for l, w in zip(layers, widths) if w < l.full}


def allocate(model: nn.Module, example: torch.Tensor, kinds: Sequence[str], budget: BudgetSpec, base: PruneSpec,
             batches: Batches | None, max_ratio: float, table: LatencyTable,
             tries: int = 5) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-layer ratios (``PruneSpec.layers``) meeting ``budget.fraction`` of dense latency, and a report.

    ``table`` (``LatencyTable.for_search`` with ``allocation: halp``) holds the layer latencies and
    every measured allocation's fraction: a rerun on the same machine reads it and returns the same widths.
    """
    layers = layers_of(model, kinds, base.round_to, max_ratio)
    if not layers:
        raise EffVisionError(f"allocation halp: {type(model).__name__} has no timm Attention (with > 1 head) or Mlp "
                             f"to allocate")
    keys = {"model", *(_entry(l, w) for l in layers for w in l.widths)}
    if not keys <= set(table.entries):
        table.update(layer_latencies(model, example, layers, budget, budget.rounds * budget.iters))
    lat = {k: table.entries[k] for k in keys}
    values = layer_values(model, example, layers, base.criterion, batches)
    total = sum(v[-1] for v in values.values())

    def measured(widths: list[int]) -> float:
        if all(w == l.full for l, w in zip(layers, widths)):
            return 1.0

        def run() -> float:
            trial = copy.deepcopy(model)
            prune_(trial, PruneSpec(criterion="l1", round_to=base.round_to, ignore=base.ignore,
                                    layers=layer_ratios(layers, widths)), example)
            return latency_fraction(trial, model, example, budget)
        return table.lookup("alloc:" + ",".join(map(str, widths)), run)

    # The layer sum mispredicts the whole model (fusions across layers, call overhead: a 4-block ViT
    # measured 0.46 where the table said 0.55), so the knapsack's target is calibrated on measurements:
    # the narrowest model anchors the scale of the savings (dense is 1.0 on both scales), then the
    # savings are rescaled by the measured miss until one target over and one under the budget are
    # known, and bisected between them.
    narrowest = [l.widths[0] for l in layers]
    dense_layers = sum(lat[_entry(l, l.full)] for l in layers)
    floor = (lat["model"] - dense_layers + sum(lat[_entry(l, w)] for l, w in zip(layers, narrowest))) / lat["model"]
    least = measured(narrowest)
    if least > budget.fraction:
        raise EffVisionError(f"budget latency <= {budget.fraction:.0%} of dense cannot be reached by allocation halp: "
                             f"every layer at its narrowest (max_ratio {max_ratio}) measures {least:.0%}")
    scale = (1 - least) / max(1 - floor, 1e-9)   # measured saving per estimated saving
    target = max(1 - (1 - budget.fraction) / scale, floor)
    trials: list[dict[str, Any]] = []
    best: tuple[list[int], float, float] | None = None
    under, over = None, None
    for _ in range(tries):
        fit = _fit(layers, lat, values, target)
        widths, estimate = fit if fit is not None else (narrowest, floor)
        got = measured(widths)
        kept = sum(values[l.name][l.widths.index(w)] for l, w in zip(layers, widths)) / total
        trials.append({"target": round(target, 4), "estimated": round(estimate, 4), "measured": round(got, 4),
                       "kept_importance": round(kept, 4), "widths": widths})
        if got <= budget.fraction and (best is None or kept > best[1]):
            best = (widths, kept, got)
        if budget.fraction - TOLERANCE <= got <= budget.fraction:
            break
        if got <= budget.fraction:
            under = target if under is None else max(under, target)
        else:
            over = target if over is None else min(over, target)
        target = (under + over) / 2 if under is not None and over is not None \
            else 1 - (1 - target) * (1 - budget.fraction) / max(1 - got, 1e-3)  # rescale the savings
    if best is None:  # measured again over the budget every time: the narrowest model is known to meet it
        best = (narrowest, sum(v[0] for v in values.values()) / total, least)
    widths, kept, got = best
    report = {"allocation": "halp", "layer_widths": {l.name: w for l, w in zip(layers, widths)},
              "halp_fraction": got, "kept_importance": kept, "halp_trials": trials,
              "halp_calibration": {"narrowest_estimated": round(floor, 4), "narrowest_measured": round(least, 4)},
              "layer_latency_ms": {k: round(v * 1e3, 4) for k, v in sorted(lat.items())}}
    return layer_ratios(layers, widths), report
